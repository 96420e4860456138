// The CUDA runtime version the kernels were compiled against, for glm_ext.build_info(). Kept in a
// .cu file so that only nvcc needs the CUDA headers.
#include <cuda_runtime_api.h>

namespace glm_ext {

int compiled_cuda_version() { return CUDART_VERSION; }

}  // namespace glm_ext
