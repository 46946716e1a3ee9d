// Run-time choice between a CPU kernel's baseline body and its AVX2 body (csrc/cpu_features.cpp,
// csrc/cpu_saliency.cpp, csrc/deep_thinking.cpp: an extension is compiled for the baseline ISA, SSE2 at most).
#pragma once

#include <ATen/Context.h>

#include <string>

namespace fastattn_icl {

// Whether the AVX2 body may run: the CPU has AVX2 (and FMA, F16C where asked), and torch was not told to stay below
// AVX2 (ATEN_CPU_CAPABILITY=default, which the tests of the baseline bodies set). x86 with GCC or clang only.
inline bool avx2_usable(bool fma, bool f16c) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  const std::string cap = at::get_cpu_capability();
  return (cap == "AVX2" || cap == "AVX512") && __builtin_cpu_supports("avx2") &&
         (!fma || __builtin_cpu_supports("fma")) && (!f16c || __builtin_cpu_supports("f16c"));
#else
  (void)fma;
  (void)f16c;
  return false;
#endif
}

}  // namespace fastattn_icl
