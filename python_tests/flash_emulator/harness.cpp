// The CUDA flash-attention kernels of csrc/attention/cuda, unchanged, run on the CPU through
// cuda_on_cpu.h and emulated_instructions.h, with the same argument checks and parameters as
// the CUDA entry points (csrc/attention/cuda/flash_host.h). Built by test_flash_emulation.py.
#include "cuda_on_cpu.h"
// Before the kernel headers: flash_primitives.cuh includes this instead of the PTX instructions.
#define GLM_EXT_FLASH_EMULATION "emulated_instructions.h"

#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "attention/attention.h"
#include "backward_kernels.cuh"
#include "flash_host.h"
#include "forward_kernel.cuh"

namespace glm_ext::cuda::flash {

// The blocks' shared memory (the kernels' `extern __shared__ smem[]`), plus a guard zone.
constexpr size_t kSharedCapacity = 228 * 1024, kGuardBytes = 4096;
alignas(128) unsigned char smem[kSharedCapacity + kGuardBytes];

namespace {

// Runs kernel(args...) for every block of the grid, one after the other. Shared memory starts
// as 0xff bytes (NaN in float16, bfloat16 and float32): reading what was never written shows.
template <typename Kernel, typename... Args>
void launch(dim3 grid, int threads, size_t shared_bytes, Kernel kernel, const Args&... args) {
  TORCH_CHECK(shared_bytes <= kSharedCapacity, "the kernel asks for ", shared_bytes, " bytes of shared memory");
  ::emu::shared_window() = {smem, smem + shared_bytes};
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        std::memset(smem, 0xff, shared_bytes + kGuardBytes);
        ::emu::run_block(grid, {x, y, z}, dim3(threads), [&] { kernel(args...); });
        for (size_t i = shared_bytes; i < shared_bytes + kGuardBytes; ++i) {
          TORCH_CHECK(smem[i] == 0xff, "block (", x, ", ", y, ", ", z, ") wrote past its shared memory");
        }
      }
    }
  }
}

// The checks of check_cuda_support that matter to the dispatch (the rest needs a GPU).
void check_supported(const MixedMaskAttentionArgs& args) {
  TORCH_CHECK_VALUE(args.head_dim == 64 || args.head_dim == 128, "head_dim 64 or 128");
  TORCH_CHECK_TYPE(args.q.scalar_type() == at::kHalf || args.q.scalar_type() == at::kBFloat16, "float16 or bfloat16");
}

// Outputs start as NaN, so that anything a kernel should write and does not shows.
at::Tensor nan_like(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::full(sizes, std::numeric_limits<float>::quiet_NaN(), options);
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                           const at::Tensor& sep, const std::optional<at::Tensor>& cu_seqlens_q,
                                           const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                           int64_t max_seqlen_k, double softmax_scale, bool deferred_copies) {
  const auto args = check_mixed_mask_attention_inputs(q_in, k_in, v_in, sep, cu_seqlens_q, cu_seqlens_k,
                                                      max_seqlen_q, max_seqlen_k, softmax_scale);
  check_supported(args);
  const auto q = with_aligned_rows(args.q), k = with_aligned_rows(args.k), v = with_aligned_rows(args.v);
  auto out = nan_like(q_in.sizes(), q_in.options());
  auto lse = nan_like(args.lse_shape(), q_in.options().dtype(at::kFloat));
  auto params = forward_params(args, q, k, v);
  set_outputs(params, out, lse);
  ::emu::deferred_copies() = deferred_copies;
  dispatch(args, [&]<typename T, int D>() {
    const dim3 grid = forward_grid<T, D>(params, length_bounds(args).first);
    launch(grid, ForwardConfig<T, D>::kThreads, ForwardConfig<T, D>::kSmemBytes, mixed_mask_forward_kernel<T, D>,
           params);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
    const at::Tensor& sep, const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool deferred_copies) {
  const auto args = check_mixed_mask_attention_backward_inputs(grad_out_in, grad_lse, q_in, k_in, v_in, out_in, lse,
                                                               sep, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                               max_seqlen_k, softmax_scale);
  const auto& fwd = args.forward;
  check_supported(fwd);
  const auto q = with_aligned_rows(fwd.q), k = with_aligned_rows(fwd.k), v = with_aligned_rows(fwd.v);
  const auto out = with_aligned_rows(args.out), grad_out = with_aligned_rows(args.grad_out);
  auto grad_q = nan_like(q_in.sizes(), q_in.options());
  auto grad_k = nan_like(k_in.sizes(), k_in.options());
  auto grad_v = nan_like(v_in.sizes(), v_in.options());
  auto delta = nan_like(fwd.lse_shape(), args.lse.options());
  auto params = backward_params(args, q, k, v, out, grad_out);
  set_gradients(params, grad_q, grad_k, grad_v, delta);
  ::emu::deferred_copies() = deferred_copies;
  const auto [bound_q, bound_k] = length_bounds(fwd);
  dispatch(fwd, [&]<typename T, int D>() {
    using Config = BackwardConfig<T, D>;
    const int64_t rows = delta_rows(params);
    launch(dim3(blocks_of(rows * 8, kDeltaThreads)), kDeltaThreads, 0, delta_kernel<T, D>, params, rows);
    launch(grad_key_value_grid<T, D>(params, bound_k), Config::kThreads, Config::kSmemBytes,
           grad_key_value_kernel<T, D>, params);
    launch(grad_query_grid<T, D>(params, bound_q), Config::kThreads, Config::kSmemBytes, grad_query_kernel<T, D>,
           params);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace glm_ext::cuda::flash

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &glm_ext::cuda::flash::forward, "mixed_mask_attention forward through the emulated CUDA kernel");
  m.def("backward", &glm_ext::cuda::flash::backward, "mixed_mask_attention backward through the emulated CUDA kernels");
}
