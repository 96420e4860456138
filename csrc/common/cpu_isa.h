// Instruction sets of the CPU kernels. The extension is built for the baseline of its platform (no
// -march flags); kernels that gain from wider vectors compile their inner loops a few times with
// function target attributes and pick one at run time with cpu_isa().
#pragma once

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define GLM_EXT_X86_KERNELS 1
#define GLM_EXT_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#define GLM_EXT_AVX2 __attribute__((target("avx2,fma")))
#else
#define GLM_EXT_X86_KERNELS 0
#endif
#define GLM_EXT_ALWAYS_INLINE inline __attribute__((always_inline))

namespace glm_ext {

enum class CpuIsa { kBaseline, kAvx2, kAvx512 };

// The widest instruction set both ATen and this CPU allow: ATen's choice honours the
// ATEN_CPU_CAPABILITY environment variable, so tests can force the narrower paths. Baseline:
// SSE2 on x86-64, NEON on arm64; AVX2 includes FMA; AVX-512 F, VL, BW and DQ.
CpuIsa cpu_isa();

}  // namespace glm_ext
