// `import megatron_emu._C_cuda` loads the CUDA kernel's library, which registers the CUDA
// implementation of megatron_emu::l2_loss_grad_ (the schema lives in the CPU extension, _C).
#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_emu CUDA extension: CUDA kernel of torch.ops.megatron_emu.l2_loss_grad_";
}
