#include "common/cpu_isa.h"

#include <ATen/Version.h>

#include <string>

namespace glm_ext {

CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
#if GLM_EXT_X86_KERNELS
    const std::string capability = at::get_cpu_capability();
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (capability == "AVX512" && avx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq")) {
      return CpuIsa::kAvx512;
    }
    if ((capability == "AVX512" || capability == "AVX2") && avx2) return CpuIsa::kAvx2;
#endif
    return CpuIsa::kBaseline;
  }();
  return isa;
}

}  // namespace glm_ext
