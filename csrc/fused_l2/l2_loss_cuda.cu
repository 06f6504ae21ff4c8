// CUDA kernel of `megatron_emu::l2_loss_grad_` (schema and contract: l2_loss_cpu.cpp).
// One block per row, 256 threads, op-math accumulation with a warp-shuffle block reduction.
// Includes only what it needs (no cuBLAS/ATen CUDA context headers), so it compiles against a
// CPU build of torch for the compile-only CI check.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace megatron_emu {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t, typename opmath_t>
__global__ void l2_loss_grad_kernel(scalar_t* __restrict__ pred, const scalar_t* __restrict__ target,
                                    opmath_t* __restrict__ row_loss, int64_t d, opmath_t scale) {
  const int64_t row = blockIdx.x;
  scalar_t* prow = pred + row * d;
  const scalar_t* trow = target + row * d;
  opmath_t acc = 0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const opmath_t diff = static_cast<opmath_t>(prow[j]) - static_cast<opmath_t>(trow[j]);
    acc += diff * diff;
    prow[j] = static_cast<scalar_t>(scale * diff);
  }
  __shared__ opmath_t partial[kThreads / 32];
  acc = warp_sum(acc);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < (blockDim.x / 32) ? partial[lane] : opmath_t(0);
    acc = warp_sum(acc);
    if (lane == 0) row_loss[row] = acc;
  }
}

at::Tensor l2_loss_grad_cuda(at::Tensor& pred, const at::Tensor& target, double grad_scale) {
  TORCH_CHECK(pred.dim() == 2 && target.sizes() == pred.sizes(), "l2_loss_grad_: shapes ",
              pred.sizes(), " and ", target.sizes());
  TORCH_CHECK(target.scalar_type() == pred.scalar_type(), "l2_loss_grad_: dtype mismatch");
  TORCH_CHECK(pred.is_cuda() && target.is_cuda() && pred.device() == target.device(),
              "l2_loss_grad_: CUDA kernel needs both tensors on one GPU");
  TORCH_CHECK(pred.is_contiguous() && target.is_contiguous(), "l2_loss_grad_: inputs must be contiguous");
  const c10::cuda::CUDAGuard guard(pred.device());
  const int64_t rows = pred.size(0), d = pred.size(1);
  const auto opmath = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({rows}, pred.options().dtype(opmath));
  if (rows == 0) return row_loss;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "l2_loss_grad_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    l2_loss_grad_kernel<scalar_t, opmath_t><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
        pred.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), row_loss.data_ptr<opmath_t>(), d,
        static_cast<opmath_t>(2.0 * grad_scale));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return row_loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(megatron_emu, CUDA, m) { m.impl("l2_loss_grad_", &l2_loss_grad_cuda); }

}  // namespace megatron_emu
