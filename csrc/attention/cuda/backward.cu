// Launches of the backward kernels (backward_kernels.cuh), one instantiation per element type
// and head dimension.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "backward_kernels.cuh"
#include "flash_kernels.h"

namespace glm_ext::cuda::flash {
namespace {

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, int threads, int smem_bytes, const BackwardParams& params,
            cudaStream_t stream) {
  if (grid.x == 0 || grid.z == 0) return;  // no rows, or no samples
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  kernel<<<grid, threads, smem_bytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename T, int D>
void run_backward(const BackwardParams& params, int64_t max_seqlen_q, int64_t max_seqlen_k, cudaStream_t stream) {
  using Config = BackwardConfig<T, D>;
  const int64_t rows = delta_rows(params);
  if (rows > 0) {
    delta_kernel<T, D><<<blocks_of(rows * 8, kDeltaThreads), kDeltaThreads, 0, stream>>>(params, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch(grad_key_value_kernel<T, D>, grad_key_value_grid<T, D>(params, max_seqlen_k), Config::kThreads,
         Config::kSmemBytes, params, stream);
  launch(grad_query_kernel<T, D>, grad_query_grid<T, D>(params, max_seqlen_q), Config::kThreads,
         Config::kSmemBytes, params, stream);
}

#define GLM_EXT_INSTANTIATE(T, D) \
  template void run_backward<T, D>(const BackwardParams&, int64_t, int64_t, cudaStream_t);
GLM_EXT_FLASH_FOR_EACH_CONFIG(GLM_EXT_INSTANTIATE)
#undef GLM_EXT_INSTANTIATE

}  // namespace glm_ext::cuda::flash
