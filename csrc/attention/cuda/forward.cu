// Launches of the forward kernel (forward_kernel.cuh), one instantiation per element type and
// head dimension.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "flash_kernels.h"
#include "forward_kernel.cuh"

namespace glm_ext::cuda::flash {

template <typename T, int D>
void run_forward(const ForwardParams& params, int64_t max_seqlen_q, cudaStream_t stream) {
  using Config = ForwardConfig<T, D>;
  const dim3 grid = forward_grid<T, D>(params, max_seqlen_q);
  if (grid.x == 0 || grid.z == 0) return;  // no query rows, or no samples
  const auto kernel = mixed_mask_forward_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Config::kSmemBytes));
  kernel<<<grid, Config::kThreads, Config::kSmemBytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define GLM_EXT_INSTANTIATE(T, D) template void run_forward<T, D>(const ForwardParams&, int64_t, cudaStream_t);
GLM_EXT_FLASH_FOR_EACH_CONFIG(GLM_EXT_INSTANTIATE)
#undef GLM_EXT_INSTANTIATE

}  // namespace glm_ext::cuda::flash
