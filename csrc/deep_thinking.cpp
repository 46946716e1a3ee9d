// fastattn_icl::fused_deep_thinking_update_: the Deep-Thinking state update (docs/methods.md §7) on CPU, one pass.
//
// fused_deep_thinking_update_(Tensor(a!) work, Tensor(b!) m, float eta, float beta, bool first) -> ()
//   work: [R, 2, C] float32, float16 or bfloat16, unit stride along C, any row strides: work[r, 0] is the state
//         X̂ (updated in place), work[r, 1] the re-run's X_new (only read).
//   m:    [R, C] float32 momentum, unit stride along C, any row stride (written; read unless `first`).
// Per element, in float32 with one rounding per operation, in the order of the per-tensor oracle
// (fastattn_icl/reference/deep_thinking.py) and of the eager torch backend:
//     g = X_new - X̂        m = g (first) else β·m + g        X̂ <- X̂ + η·m
// with η and β rounded to float32 once, as torch rounds a Python scalar in a float32 op. For an fp16/bf16 state X̂
// and X_new are widened to float32 and the new X̂ is rounded once, to its dtype (round to nearest even). So the
// result is bitwise the oracle's: a fused multiply-add (one rounding instead of two) would not be, and setup.py
// builds with -ffp-contract=off so that no compiler contracts β·m + g or X̂ + η·m.
//
// Memory-bound: each element of X̂, X_new and m is read once and X̂, m written once (the eager chain makes several
// passes). Rows are cut into column blocks so that a few long rows still spread over the threads (at::parallel_for,
// which needs the -fopenmp of setup.py); the update is element-wise, so the result does not depend on the number of
// threads. Two bodies: AVX2 + F16C intrinsics on x86 CPUs that have them (chosen at run time), else at::vec, whose
// generic build is what an extension compiled for the baseline ISA gets. The Python wrapper
// (fastattn_icl/ops/deep_thinking.py) gives typed errors for bad input; the checks here keep a direct call through
// torch.ops from reading out of bounds.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "cpu_isa.h"

#include <algorithm>
#include <string>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FASTATTN_ICL_X86_SIMD 1
#include <immintrin.h>
#else
#define FASTATTN_ICL_X86_SIMD 0
#endif

namespace fastattn_icl {

namespace {

using Vec = at::vec::Vectorized<float>;

// Columns per task: long rows are split so that R = 1 still uses every thread.
constexpr int64_t kBlockColumns = 8192;
// Elements per thread before going parallel: below this the hand-off costs more than it saves.
constexpr int64_t kGrainElements = int64_t{1} << 16;

// One element in scalar code: the tail of a row, and the reference for the vector body below.
template <bool FIRST, typename scalar_t>
inline void update_one(scalar_t* x_hat, const scalar_t* x_new, float* m, float eta, float beta) {
  const float xh = static_cast<float>(*x_hat);
  const float g = static_cast<float>(*x_new) - xh;
  float mom = g;
  if constexpr (!FIRST) {
    const float decayed = beta * *m;
    mom = decayed + g;
  }
  *m = mom;
  const float step = eta * mom;
  *x_hat = static_cast<scalar_t>(xh + step);
}

template <bool FIRST>
inline Vec momentum(const Vec& g, const float* m, const Vec& beta) {
  if constexpr (FIRST) {
    return g;
  } else {
    const Vec decayed = beta * Vec::loadu(m);
    return decayed + g;
  }
}

template <bool FIRST>
void update_span(float* x_hat, const float* x_new, float* m, int64_t n, float eta, float beta) {
  const Vec veta(eta), vbeta(beta);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec xh = Vec::loadu(x_hat + j);
    const Vec g = Vec::loadu(x_new + j) - xh;
    const Vec mom = momentum<FIRST>(g, m + j, vbeta);
    mom.store(m + j);
    const Vec step = veta * mom;
    (xh + step).store(x_hat + j);
  }
  for (; j < n; ++j) {
    update_one<FIRST>(x_hat + j, x_new + j, m + j, eta, beta);
  }
}

// fp16 / bf16 state: a vector of the state's dtype holds two float vectors.
template <bool FIRST, typename scalar_t>
void update_span(scalar_t* x_hat, const scalar_t* x_new, float* m, int64_t n, float eta, float beta) {
  using RVec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kFloats = Vec::size();
  static_assert(RVec::size() == 2 * kFloats, "a reduced-precision vector holds two float vectors");
  const Vec veta(eta), vbeta(beta);
  int64_t j = 0;
  for (; j + RVec::size() <= n; j += RVec::size()) {
    const auto [xh0, xh1] = at::vec::convert_to_float<scalar_t>(RVec::loadu(x_hat + j));
    const auto [xn0, xn1] = at::vec::convert_to_float<scalar_t>(RVec::loadu(x_new + j));
    const Vec m0 = momentum<FIRST>(xn0 - xh0, m + j, vbeta);
    const Vec m1 = momentum<FIRST>(xn1 - xh1, m + j + kFloats, vbeta);
    m0.store(m + j);
    m1.store(m + j + kFloats);
    const Vec step0 = veta * m0;
    const Vec step1 = veta * m1;
    at::vec::convert_from_float<scalar_t>(xh0 + step0, xh1 + step1).store(x_hat + j);
  }
  for (; j < n; ++j) {
    update_one<FIRST>(x_hat + j, x_new + j, m + j, eta, beta);
  }
}

#if FASTATTN_ICL_X86_SIMD
// AVX2 (+ F16C) bodies, chosen at run time. An extension is compiled once, for the baseline ISA, so at::vec above
// is its generic build (SSE2 arithmetic, scalar fp16 <-> float conversion: measured 2x slower than the eager ops on
// an fp16 state); these functions carry their own target attribute instead. Same operations, same order, same rounding
// (vcvtps2ph and the bf16 rounding below round to nearest even, as c10's conversions do), so either path gives the
// same bits.
#define FASTATTN_ICL_AVX2 __attribute__((target("avx2,f16c")))

template <bool FIRST>
FASTATTN_ICL_AVX2 inline __m256 momentum_avx2(__m256 g, const float* m, __m256 beta) {
  if constexpr (FIRST) {
    return g;
  } else {
    const __m256 decayed = _mm256_mul_ps(beta, _mm256_loadu_ps(m));
    return _mm256_add_ps(decayed, g);
  }
}

// 8 elements from float32 (xh, xn): stores m, returns the new X̂ in float32.
template <bool FIRST>
FASTATTN_ICL_AVX2 inline __m256 step_avx2(__m256 xh, __m256 xn, float* m, __m256 eta, __m256 beta) {
  const __m256 mom = momentum_avx2<FIRST>(_mm256_sub_ps(xn, xh), m, beta);
  _mm256_storeu_ps(m, mom);
  return _mm256_add_ps(xh, _mm256_mul_ps(eta, mom));
}

FASTATTN_ICL_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
FASTATTN_ICL_AVX2 inline void store8(float* p, __m256 x) { _mm256_storeu_ps(p, x); }

FASTATTN_ICL_AVX2 inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
FASTATTN_ICL_AVX2 inline void store8(at::Half* p, __m256 x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

FASTATTN_ICL_AVX2 inline __m256 load8(const at::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
// c10::BFloat16(float): round to nearest even (add 0x7FFF plus the kept part's lowest bit), NaN to 0x7FC0
FASTATTN_ICL_AVX2 inline void store8(at::BFloat16* p, __m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

template <bool FIRST, typename scalar_t>
FASTATTN_ICL_AVX2 void update_span_avx2(scalar_t* x_hat, const scalar_t* x_new, float* m, int64_t n, float eta,
                                        float beta) {
  const __m256 veta = _mm256_set1_ps(eta), vbeta = _mm256_set1_ps(beta);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    store8(x_hat + j, step_avx2<FIRST>(load8(x_hat + j), load8(x_new + j), m + j, veta, vbeta));
  }
  for (; j < n; ++j) {
    update_one<FIRST>(x_hat + j, x_new + j, m + j, eta, beta);
  }
}

// AVX2 and F16C on this CPU, and torch not told to stay below AVX2 (ATEN_CPU_CAPABILITY=default)
bool use_avx2() {
  static const bool yes = avx2_usable(/*fma=*/false, /*f16c=*/true);
  return yes;
}
#else
constexpr bool use_avx2() { return false; }
#endif

template <bool FIRST, typename scalar_t>
void update_rows(const at::Tensor& work, const at::Tensor& m, float eta, float beta) {
  const int64_t R = work.size(0);
  const int64_t C = work.size(2);
  scalar_t* base = work.data_ptr<scalar_t>();
  float* m_base = m.data_ptr<float>();
  const int64_t sw_row = work.stride(0);
  const int64_t sw_slot = work.stride(1);
  const int64_t sm_row = m.stride(0);
  const int64_t block = std::min(C, kBlockColumns);
  const int64_t blocks_per_row = (C + block - 1) / block;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / block);
  const bool avx2 = use_avx2();  // once per call, outside the threads

  at::parallel_for(0, R * blocks_per_row, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / blocks_per_row;
      const int64_t c0 = (task % blocks_per_row) * block;
      const int64_t n = std::min(block, C - c0);
      scalar_t* x_hat = base + r * sw_row + c0;
      float* m_row = m_base + r * sm_row + c0;
#if FASTATTN_ICL_X86_SIMD
      if (avx2) {
        update_span_avx2<FIRST>(x_hat, x_hat + sw_slot, m_row, n, eta, beta);
        continue;
      }
#else
      (void)avx2;
#endif
      update_span<FIRST>(x_hat, x_hat + sw_slot, m_row, n, eta, beta);
    }
  });
}

template <typename scalar_t>
void dispatch_first(const at::Tensor& work, const at::Tensor& m, float eta, float beta, bool first) {
  if (first) {
    update_rows<true, scalar_t>(work, m, eta, beta);
  } else {
    update_rows<false, scalar_t>(work, m, eta, beta);
  }
}

void check_inputs(const at::Tensor& work, const at::Tensor& m) {
  const char* op = "fused_deep_thinking_update_";
  TORCH_CHECK(work.layout() == at::kStrided && m.layout() == at::kStrided, op, ": work and m must be strided tensors");
  TORCH_CHECK(work.dim() == 3 && work.size(1) == 2, op, ": work must be [R, 2, C], got shape ", work.sizes());
  const auto dtype = work.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": work must be float32, float16 or bfloat16, got ", dtype);
  const int64_t R = work.size(0);
  const int64_t C = work.size(2);
  TORCH_CHECK(m.scalar_type() == at::kFloat, op, ": m must be float32, got ", m.scalar_type());
  TORCH_CHECK(m.dim() == 2 && m.size(0) == R && m.size(1) == C, op, ": m must be [R, C] = [", R, ", ", C,
              "], got shape ", m.sizes());
  TORCH_CHECK(work.device().is_cpu() && m.device().is_cpu(), op, ": the CPU kernel got work on ", work.device(),
              " and m on ", m.device());
  TORCH_CHECK(C <= 1 || (work.stride(2) == 1 && m.stride(1) == 1), op,
              ": work and m must have unit stride along C, got strides ", work.strides(), " and ", m.strides());
}

void fused_deep_thinking_update_cpu(const at::Tensor& work, const at::Tensor& m, double eta, double beta,
                                    bool first) {
  check_inputs(work, m);
  if (work.numel() == 0) {
    return;
  }
  // float32 coefficients, as torch rounds a Python float multiplying a float32 tensor
  const float eta_f = static_cast<float>(eta);
  const float beta_f = static_cast<float>(beta);
  switch (work.scalar_type()) {
    case at::kFloat: dispatch_first<float>(work, m, eta_f, beta_f, first); break;
    case at::kHalf: dispatch_first<at::Half>(work, m, eta_f, beta_f, first); break;
    default: dispatch_first<at::BFloat16>(work, m, eta_f, beta_f, first); break;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn_icl, CPU, m) {
  m.impl("fused_deep_thinking_update_", &fused_deep_thinking_update_cpu);
}

}  // namespace fastattn_icl
