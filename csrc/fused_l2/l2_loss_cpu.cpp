// megatron_emu fused embedding-regression loss: the `megatron_emu::l2_loss_grad_` operator.
//
//   l2_loss_grad_(Tensor(a!) pred, Tensor target, float grad_scale) -> Tensor row_loss
//
// One pass over a [rows, D] block: row_loss[m] = sum_d (pred[m,d] - target[m,d])^2, accumulated
// in the op-math type (float for fp32/bf16/fp16, double for fp64), and pred is overwritten with
// its gradient 2 * grad_scale * (pred - target). No [rows, D] temporaries. The schema declares
// the mutation, so functionalization, torch.compile and torch.library.opcheck understand it.
// This file registers the schema and the CPU kernel (rows in parallel); l2_loss_cuda.cu adds the
// CUDA kernel with the same contract.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

namespace megatron_emu {

static void check_inputs(const at::Tensor& pred, const at::Tensor& target) {
  TORCH_CHECK(pred.dim() == 2, "l2_loss_grad_: pred must be [rows, D], got ", pred.sizes());
  TORCH_CHECK(target.sizes() == pred.sizes(), "l2_loss_grad_: target ", target.sizes(),
              " does not match pred ", pred.sizes());
  TORCH_CHECK(target.scalar_type() == pred.scalar_type(), "l2_loss_grad_: dtype mismatch ",
              pred.scalar_type(), " vs ", target.scalar_type());
  TORCH_CHECK(pred.is_contiguous() && target.is_contiguous(),
              "l2_loss_grad_: pred and target must be contiguous");
}

template <typename scalar_t>
static void l2_loss_grad_rows(scalar_t* p, const scalar_t* t, at::opmath_type<scalar_t>* out,
                              int64_t rows, int64_t d, double grad_scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t scale = static_cast<opmath_t>(2.0 * grad_scale);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      scalar_t* prow = p + m * d;
      const scalar_t* trow = t + m * d;
      opmath_t acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < d; ++j) {
        const opmath_t diff = static_cast<opmath_t>(prow[j]) - static_cast<opmath_t>(trow[j]);
        acc += diff * diff;
        prow[j] = static_cast<scalar_t>(scale * diff);
      }
      out[m] = acc;
    }
  });
}

at::Tensor l2_loss_grad_cpu(at::Tensor& pred, const at::Tensor& target, double grad_scale) {
  check_inputs(pred, target);
  TORCH_CHECK(pred.device().is_cpu() && target.device().is_cpu(), "l2_loss_grad_: CPU kernel got ",
              pred.device());
  const int64_t rows = pred.size(0), d = pred.size(1);
  const auto opmath = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({rows}, pred.options().dtype(opmath));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "l2_loss_grad_cpu", [&] {
    l2_loss_grad_rows<scalar_t>(pred.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(),
                                row_loss.data_ptr<at::opmath_type<scalar_t>>(), rows, d, grad_scale);
  });
  return row_loss;
}

TORCH_LIBRARY(megatron_emu, m) {
  m.def("l2_loss_grad_(Tensor(a!) pred, Tensor target, float grad_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(megatron_emu, CPU, m) { m.impl("l2_loss_grad_", &l2_loss_grad_cpu); }

}  // namespace megatron_emu

// `import megatron_emu._C` loads this library, which registers the operator above; call it as
// torch.ops.megatron_emu.l2_loss_grad_ (dispatcher: CPU here, CUDA from _C_cuda, fake in Python).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_emu CPU extension: registers torch.ops.megatron_emu.l2_loss_grad_";
  m.attr("operators") = pybind11::make_tuple("megatron_emu::l2_loss_grad_");
}
