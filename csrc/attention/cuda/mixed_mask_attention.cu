// CUDA entry points of mixed_mask_attention: argument checks (attention/attention.h plus what the flash
// kernels support), the kernels' parameters, and the device-side contract check. sep and
// cu_seqlens are never read on the host (no synchronisation, CUDA-graph safe): a small kernel
// checks them on the device, and when any sample breaks the contract every output of the call
// is filled with NaN (the CPU kernels raise instead).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "attention/attention.h"
#include "attention/cuda/flash_host.h"
#include "attention/cuda/flash_kernels.h"
#include "common/cuda/launch_utils.cuh"

namespace glm_ext {
namespace {

using cuda::flash::BackwardParams;
using cuda::flash::dispatch;
using cuda::flash::ForwardParams;
using cuda::flash::length_bounds;
using cuda::flash::set_gradients;
using cuda::flash::set_outputs;
using cuda::flash::Sample;
using cuda::flash::with_aligned_rows;

void check_cuda_support(const MixedMaskAttentionArgs& args) {
  const auto* device = at::cuda::getDeviceProperties(args.q.device().index());
  TORCH_CHECK_VALUE(device->major >= 8, "mixed_mask_attention: the CUDA kernel needs compute capability 8.0 or "
                    "newer (Ampere), got ", device->major, ".", device->minor, " (", device->name, ")");
  const auto dtype = args.q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16,
                   "mixed_mask_attention: the CUDA kernel takes float16 or bfloat16 q, k and v, got ", dtype);
  TORCH_CHECK_VALUE(args.head_dim == 64 || args.head_dim == 128,
                    "mixed_mask_attention: the CUDA kernel takes head_dim 64 or 128, got ", args.head_dim);
  constexpr int64_t kMaxGridYZ = 65535;
  TORCH_CHECK_VALUE(args.heads_q <= kMaxGridYZ && args.num_samples <= kMaxGridYZ,
                    "mixed_mask_attention: the CUDA kernel takes at most ", kMaxGridYZ,
                    " heads and samples, got ", args.heads_q, " heads and ", args.num_samples, " samples");
  TORCH_CHECK_VALUE(args.seq_q <= std::numeric_limits<int32_t>::max() &&
                        args.seq_k <= std::numeric_limits<int32_t>::max(),
                    "mixed_mask_attention: sequences longer than 2^31 - 1 tokens are not supported");
}

// *invalid = 1 when a sample breaks the contract that the CPU kernels check on the host (the
// kernels skip such samples, so nothing is read out of bounds), else 0. One block.
__global__ void check_samples_kernel(const ForwardParams p, int64_t bound_q, int64_t bound_k, int* invalid) {
  bool bad = false;
  for (int s = threadIdx.x; s < p.num_samples; s += blockDim.x) {
    Sample sample;
    bad = bad || !cuda::flash::resolve_sample(p, s, sample) || sample.len_q > bound_q || sample.len_k > bound_k;
  }
  if (threadIdx.x == 0 && p.cu_seqlens_q != nullptr) {
    const int n = p.num_samples;
    bad = bad || p.cu_seqlens_q[0] != 0 || p.cu_seqlens_k[0] != 0 || p.cu_seqlens_q[n] != p.seq_q ||
          p.cu_seqlens_k[n] != p.seq_k;
  }
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) *invalid = bad;
}

template <typename T>
__global__ void fill_nan_if_invalid_kernel(T* data, int64_t n, const int* invalid) {
  if (!*invalid) return;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    data[i] = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
  }
}

at::Tensor check_samples(const ForwardParams& p, const MixedMaskAttentionArgs& args, cudaStream_t stream) {
  auto invalid = at::empty({1}, args.q.options().dtype(at::kInt));
  const auto [bound_q, bound_k] = length_bounds(args);
  check_samples_kernel<<<1, 256, 0, stream>>>(p, bound_q, bound_k, invalid.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return invalid;
}

void fill_nan_if_invalid(at::Tensor& t, const at::Tensor& invalid, cudaStream_t stream) {
  if (t.numel() == 0) return;
  const int64_t blocks = std::min(cuda::ceil_div(t.numel(), cuda::kThreadsPerBlock), cuda::max_grid_blocks());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "fill_nan_if_invalid", [&] {
    fill_nan_if_invalid_kernel<scalar_t><<<blocks, cuda::kThreadsPerBlock, 0, stream>>>(
        t.mutable_data_ptr<scalar_t>(), t.numel(), invalid.const_data_ptr<int>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> mixed_mask_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& sep,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale) {
  const auto args = check_mixed_mask_attention_inputs(q_in, k_in, v_in, sep, cu_seqlens_q, cu_seqlens_k,
                                                      max_seqlen_q, max_seqlen_k, softmax_scale);
  check_cuda_support(args);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const auto q = with_aligned_rows(args.q), k = with_aligned_rows(args.k), v = with_aligned_rows(args.v);
  auto out = at::empty(q_in.sizes(), q_in.options());
  auto lse = at::empty(args.lse_shape(), q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto params = cuda::flash::forward_params(args, q, k, v);
  set_outputs(params, out, lse);
  const auto invalid = check_samples(params, args, stream);
  dispatch(args, [&]<typename T, int D>() {
    cuda::flash::run_forward<T, D>(params, length_bounds(args).first, stream);
  });
  fill_nan_if_invalid(out, invalid, stream);
  fill_nan_if_invalid(lse, invalid, stream);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixed_mask_attention_backward_cuda(
    const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
    const at::Tensor& sep, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double softmax_scale) {
  const auto args = check_mixed_mask_attention_backward_inputs(grad_out_in, grad_lse, q_in, k_in, v_in, out_in,
                                                               lse, sep, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                               max_seqlen_k, softmax_scale);
  const auto& fwd = args.forward;
  check_cuda_support(fwd);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const auto q = with_aligned_rows(fwd.q), k = with_aligned_rows(fwd.k), v = with_aligned_rows(fwd.v);
  const auto grad_out = with_aligned_rows(args.grad_out), out = with_aligned_rows(args.out);
  auto grad_q = at::empty(q_in.sizes(), q_in.options());
  auto grad_k = at::empty(k_in.sizes(), k_in.options());
  auto grad_v = at::empty(v_in.sizes(), v_in.options());
  if (grad_q.numel() == 0 && grad_k.numel() == 0) return {grad_q, grad_k, grad_v};
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto delta = at::empty(fwd.lse_shape(), args.lse.options());

  auto params = cuda::flash::backward_params(args, q, k, v, out, grad_out);
  set_gradients(params, grad_q, grad_k, grad_v, delta);
  const auto invalid = check_samples(params, fwd, stream);
  const auto [bound_q, bound_k] = length_bounds(fwd);
  dispatch(fwd, [&]<typename T, int D>() { cuda::flash::run_backward<T, D>(params, bound_q, bound_k, stream); });
  for (auto* grad : {&grad_q, &grad_k, &grad_v}) fill_nan_if_invalid(*grad, invalid, stream);
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(glm_ext, CUDA, m) {
  m.impl("mixed_mask_attention", &mixed_mask_attention_cuda);
  m.impl("mixed_mask_attention_backward", &mixed_mask_attention_backward_cuda);
}

}  // namespace glm_ext
