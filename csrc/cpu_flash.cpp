// Plain attention on CPU without a key mask, forward and backward (fastattn_icl/ops/_torch_backend.py: _flash_fwd,
// _flash_bwd; the math is docs/methods.md §1), the fast path next to PyTorch's CPU flash kernel:
//   q: [B, H, Tq, D]   k, v: [B, Hkv, Tk, D]   all float32 or all float64, any strides (copied where BLAS cannot read
//   the rows); query row i sits at key position i + Tk − Tq (bottom-right causal, Tq <= Tk when causal)
//   flash_attention_fwd -> out [B, H, Tq, D] (laid out as q when q is contiguous, else as [B, Tq, H, D] memory, the
//                          promise of fastattn_icl.ops._validate.output_like), lse [B, H, Tq] (−inf: no key seen)
//   flash_attention_bwd (grad_out, q, k, v, out, lse) -> dq [B, H, Tq, D], dk, dv [B, Hkv, Tk, D], contiguous.
//   The forward's optional key_weights w [B, H, Tk] (q's dtype) scale P's columns in the values' product, not its
//   sum: out = (P ⊙ w) v with P and lse unweighted (the anchor re-weighting of docs/methods.md §2 on rows that all
//   take it, where the Python backend otherwise multiplies a copy of v by w).
// With P = exp(scale · q kᵀ − lse) over the keys a row sees, delta = rowsum(dO ⊙ O), dS = P ⊙ (dO vᵀ − delta):
//   out = P v,   dv = Pᵀ dO,   dq = scale · dS k,   dk = scale · dSᵀ q.
//
// Per (batch row, query head), a task of at::parallel_for, over blocks of 64 query rows and at most 512 keys (the keys
// a causal block sees, no more), each block's scores by a BLAS GEMM and kept in cache for the next ones. Forward: the
// online softmax (a running row max and sum; the block's accumulator rescaled when the max moves), exp and row sum in
// one pass, out += P v by a GEMM. Backward: P in place in one pass (a row with lse = −inf sees no key and gets P = 0),
// four more GEMMs (dv += Pᵀ dO, dP = dO vᵀ, dq += dS k, dk += dSᵀ q) with dS formed in one pass. exp is floored as in
// the Python backend (an argument below exp_floor gives 0). PyTorch's kernel spends up to twice the time on the same
// work at the short lengths of an ICL prompt (the A/B in README.md, CPU section). The query heads of a kv head (GQA)
// each add into their own dk/dv scratch, summed at the end, so no two tasks write the same memory.
//
// The GEMMs call the BLAS that libtorch_cpu carries (sgemm_/dgemm_, found once with dlsym: MKL in the x86 wheels), or,
// where it has none or FASTATTN_ICL_CPU_GEMM=aten is set (the tests run both), at::addmm_ on views of the blocks; a
// row stride BLAS cannot take (below D: an expanded gradient) is copied first. The element-wise passes have an AVX2 +
// FMA body (chosen at run time, cpu_isa.h) next to the baseline one; float64 runs the baseline body (std::exp), float32
// on AVX2 a vectorised exp (Cephes' polynomial, within 2 ulp of std::exp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_isa.h"

#if defined(__linux__)
#include <dlfcn.h>
#endif
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTATTN_ICL_FB_X86 1
#define FASTATTN_ICL_FB_AVX2 __attribute__((target("avx2,fma")))
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastattn_icl {

namespace {

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 512;

template <typename T>
constexpr T floor_of();
template <>
constexpr float floor_of<float>() {
  return -72.0f;  // exp_floor of csrc/cpu_features.cpp and _EXP_FLOOR of the Python backend
}
template <>
constexpr double floor_of<double>() {
  return -688.0;
}

// ---- GEMM, row-major: C[M, N] = alpha · op(A) op(B) + beta · C, op(X) = Xᵀ when its flag is set.
template <typename T>
using fortran_gemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*,
                              const int*, const T*, const int*, const T*, T*, const int*);

template <typename T>
fortran_gemm<T> find_blas(const char* name) {
#if defined(__linux__)
  void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  return lib == nullptr ? nullptr : reinterpret_cast<fortran_gemm<T>>(dlsym(lib, name));
#else
  (void)name;
  return nullptr;
#endif
}

template <typename T>
fortran_gemm<T> blas();
template <>
fortran_gemm<float> blas<float>() {
  static const fortran_gemm<float> f = find_blas<float>("sgemm_");
  return f;
}
template <>
fortran_gemm<double> blas<double>() {
  static const fortran_gemm<double> f = find_blas<double>("dgemm_");
  return f;
}

template <typename T>
struct Gemm {
  fortran_gemm<T> f;  // nullptr: at::addmm_
  at::TensorOptions opts;

  // A is M × K (K × M when ta) with row stride lda; B is K × N (N × K when tb) with row stride ldb.
  void operator()(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
                  int64_t ldb, T beta, T* C, int64_t ldc) const {
    if (M == 0 || N == 0) {
      return;
    }
    if (f != nullptr) {  // column-major: Cᵀ = op(B)ᵀ op(A)ᵀ
      const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
      const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
      const char transa = tb ? 'T' : 'N', transb = ta ? 'T' : 'N';
      f(&transa, &transb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
      return;
    }
    auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
      at::Tensor x = at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, opts);
      return t ? x.t() : x;
    };
    at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
    if (K == 0) {
      beta == T(0) ? c.zero_() : c.mul_(beta);
      return;
    }
    c.addmm_(view(A, ta ? K : M, ta ? M : K, lda, ta), view(B, tb ? N : K, tb ? K : N, ldb, tb), beta, alpha);
  }
};

// ---- The two element-wise passes of a block of m rows × n keys (row stride ld), baseline and AVX2 bodies.
// p_row: s <- exp(scale · s − lse) over the first `seen` keys (0 below the floor), 0 after them.
// ds_row: p <- p · (dp − delta).
template <typename T>
inline void p_row_base(T* s, int64_t seen, int64_t n, T scale, T lse) {
  const T floor = floor_of<T>();
  for (int64_t j = 0; j < seen; ++j) {
    const T x = s[j] * scale - lse;
    s[j] = x < floor ? T(0) : std::exp(x);
  }
  std::fill(s + std::max<int64_t>(seen, 0), s + n, T(0));
}

template <typename T>
inline void ds_row_base(T* p, const T* dp, int64_t n, T delta) {
  for (int64_t j = 0; j < n; ++j) {
    p[j] *= dp[j] - delta;
  }
}

#ifdef FASTATTN_ICL_FB_X86
// exp of 8 floats in [floor, 88.3] (NaN stays NaN): x = k·ln 2 + r, |r| <= ln 2 / 2, exp(r) by Cephes' degree-5
// polynomial, 2^k through the exponent bits.
FASTATTN_ICL_FB_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x);  // min/max return the second operand on NaN: x
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);
  __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}

FASTATTN_ICL_FB_AVX2 void p_row_avx2(float* s, int64_t seen, int64_t n, float scale, float lse) {
  const __m256 vs = _mm256_set1_ps(scale), vl = _mm256_set1_ps(lse), vf = _mm256_set1_ps(floor_of<float>());
  int64_t j = 0;
  for (; j + 8 <= seen; j += 8) {
    const __m256 x = _mm256_fmsub_ps(_mm256_loadu_ps(s + j), vs, vl);
    const __m256 keep = _mm256_cmp_ps(x, vf, _CMP_NLT_UQ);  // x >= floor, or NaN
    _mm256_storeu_ps(s + j, _mm256_and_ps(exp8(x), keep));
  }
  for (; j < seen; ++j) {
    const float x = std::fma(s[j], scale, -lse);
    s[j] = x < floor_of<float>() ? 0.0f : std::exp(x);
  }
  std::fill(s + std::max<int64_t>(seen, 0), s + n, 0.0f);
}

FASTATTN_ICL_FB_AVX2 void ds_row_avx2(float* p, const float* dp, int64_t n, float delta) {
  for (int64_t j = 0; j < n; ++j) {  // vectorised by the compiler under the AVX2 target
    p[j] *= dp[j] - delta;
  }
}

FASTATTN_ICL_FB_AVX2 void ds_row_avx2(double* p, const double* dp, int64_t n, double delta) {
  for (int64_t j = 0; j < n; ++j) {
    p[j] *= dp[j] - delta;
  }
}

// The largest of n floats, NaN if one is NaN (max_ps alone would drop it).
FASTATTN_ICL_FB_AVX2 float max_avx2(const float* s, int64_t n) {
  __m256 acc = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 x = _mm256_loadu_ps(s + j);
    acc = _mm256_max_ps(acc, x);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(nan) != 0) {
    return std::numeric_limits<float>::quiet_NaN();
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  float out = _mm_cvtss_f32(h);
  for (; j < n; ++j) {
    if (std::isnan(s[j])) {
      return s[j];
    }
    out = std::max(out, s[j]);
  }
  return out;
}

// s <- exp(scale · s − m) over the first `seen` keys (0 below the floor), 0 after them; returns their sum. With w
// (not null), s then holds exp(..) · w[j] and the sum stays unweighted.
FASTATTN_ICL_FB_AVX2 float exp_sum_avx2(float* s, int64_t seen, int64_t n, float scale, float m, const float* w) {
  const __m256 vs = _mm256_set1_ps(scale), vm = _mm256_set1_ps(m), vf = _mm256_set1_ps(floor_of<float>());
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= seen; j += 8) {
    const __m256 x = _mm256_fmsub_ps(_mm256_loadu_ps(s + j), vs, vm);
    const __m256 e = _mm256_and_ps(exp8(x), _mm256_cmp_ps(x, vf, _CMP_NLT_UQ));
    _mm256_storeu_ps(s + j, w == nullptr ? e : _mm256_mul_ps(e, _mm256_loadu_ps(w + j)));
    acc = _mm256_add_ps(acc, e);
  }
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  float sum = _mm_cvtss_f32(h);
  for (; j < seen; ++j) {
    const float x = std::fma(s[j], scale, -m);
    const float e = x < floor_of<float>() ? 0.0f : std::exp(x);
    s[j] = w == nullptr ? e : e * w[j];
    sum += e;
  }
  std::fill(s + std::max<int64_t>(seen, 0), s + n, 0.0f);
  return sum;
}
#endif

template <typename T>
inline T max_base(const T* s, int64_t n) {  // NaN if one is NaN
  T out = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(s[j])) {
      return s[j];
    }
    out = std::max(out, s[j]);
  }
  return out;
}

template <typename T>
inline T exp_sum_base(T* s, int64_t seen, int64_t n, T scale, T m, const T* w) {
  const T floor = floor_of<T>();
  T sum = 0;
  for (int64_t j = 0; j < seen; ++j) {
    const T x = s[j] * scale - m;
    const T e = x < floor ? T(0) : std::exp(x);
    s[j] = w == nullptr ? e : e * w[j];
    sum += e;
  }
  std::fill(s + std::max<int64_t>(seen, 0), s + n, T(0));
  return sum;
}

// The row passes for float32 on AVX2, else the baseline bodies (float64 always).
template <typename T>
T row_max(bool avx2, const T* s, int64_t n) {
#ifdef FASTATTN_ICL_FB_X86
  if constexpr (std::is_same_v<T, float>) {
    if (avx2) {
      return max_avx2(s, n);
    }
  }
#endif
  return max_base(s, n);
}

template <typename T>
T row_exp_sum(bool avx2, T* s, int64_t seen, int64_t n, T scale, T m, const T* w) {
#ifdef FASTATTN_ICL_FB_X86
  if constexpr (std::is_same_v<T, float>) {
    if (avx2) {
      return exp_sum_avx2(s, seen, n, scale, m, w);
    }
  }
#endif
  return exp_sum_base(s, seen, n, scale, m, w);
}

template <typename T>
void p_row(bool avx2, T* s, int64_t seen, int64_t n, T scale, T lse) {
#ifdef FASTATTN_ICL_FB_X86
  if constexpr (std::is_same_v<T, float>) {
    if (avx2) {
      p_row_avx2(s, seen, n, scale, lse);
      return;
    }
  }
#endif
  p_row_base(s, seen, n, scale, lse);
}

template <typename T>
void ds_row(bool avx2, T* p, const T* dp, int64_t n, T delta) {
#ifdef FASTATTN_ICL_FB_X86
  if (avx2) {
    ds_row_avx2(p, dp, n, delta);
    return;
  }
#endif
  ds_row_base(p, dp, n, delta);
}

template <typename T>
struct Problem {
  const T *q, *k, *v, *o, *g, *lse;
  int64_t qs[3], ks[3], vs[3], os[3], gs[3], ls[3];  // strides along (batch, head, row)
  T *dq, *dk, *dv;                                   // dq [B, H, Tq, D]; dk, dv [B, Hd, Tk, D], Hd = Hkv or H
  int64_t B, H, G, Tq, Tk, D;
  bool causal, dk_per_query_head;
  T scale;
};

template <typename T>
void backward_task(const Problem<T>& p, const Gemm<T>& gemm, bool avx2, int64_t bh, std::vector<T>& s_buf,
                   std::vector<T>& dp_buf, std::vector<T>& delta) {
  const int64_t b = bh / p.H, h = bh % p.H, hk = h / p.G, D = p.D;
  const T* q = p.q + b * p.qs[0] + h * p.qs[1];
  const T* o = p.o + b * p.os[0] + h * p.os[1];
  const T* g = p.g + b * p.gs[0] + h * p.gs[1];
  const T* lse = p.lse + b * p.ls[0] + h * p.ls[1];
  const T* k = p.k + b * p.ks[0] + hk * p.ks[1];
  const T* v = p.v + b * p.vs[0] + hk * p.vs[1];
  const int64_t hd = p.dk_per_query_head ? h : hk, Hd = p.dk_per_query_head ? p.H : p.H / p.G;
  T* dq = p.dq + (b * p.H + h) * p.Tq * D;
  T* dk = p.dk + (b * Hd + hd) * p.Tk * D;
  T* dv = p.dv + (b * Hd + hd) * p.Tk * D;
  const int64_t off = p.Tk - p.Tq;
  T* s = s_buf.data();
  T* dp = dp_buf.data();
  for (int64_t i0 = 0; i0 < p.Tq; i0 += kBlockQ) {
    const int64_t m = std::min(kBlockQ, p.Tq - i0);
    const int64_t kend = p.causal ? std::min(p.Tk, i0 + m + off) : p.Tk;  // keys the block's last row sees
    const T* qi = q + i0 * p.qs[2];
    const T* gi = g + i0 * p.gs[2];
    for (int64_t r = 0; r < m; ++r) {
      const T* orow = o + (i0 + r) * p.os[2];
      const T* grow = gi + r * p.gs[2];
      T acc = 0;
      for (int64_t d = 0; d < D; ++d) {
        acc += grow[d] * orow[d];
      }
      delta[r] = acc;
    }
    for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
      const int64_t n = std::min(kBlockK, kend - j0);
      const T* kj = k + j0 * p.ks[2];
      const T* vj = v + j0 * p.vs[2];
      gemm(false, true, m, n, D, T(1), qi, p.qs[2], kj, p.ks[2], T(0), s, kBlockK);
      for (int64_t r = 0; r < m; ++r) {
        const T l = lse[(i0 + r) * p.ls[2]];
        int64_t seen = p.causal ? std::min(n, i0 + r + off + 1 - j0) : n;
        if (l == -std::numeric_limits<T>::infinity()) {
          seen = 0;  // the row sees no key
        }
        p_row(avx2, s + r * kBlockK, seen, n, p.scale, l);
      }
      gemm(true, false, n, D, m, T(1), s, kBlockK, gi, p.gs[2], T(1), dv + j0 * D, D);
      gemm(false, true, m, n, D, T(1), gi, p.gs[2], vj, p.vs[2], T(0), dp, kBlockK);
      for (int64_t r = 0; r < m; ++r) {
        ds_row(avx2, s + r * kBlockK, dp + r * kBlockK, n, delta[r]);
      }
      gemm(false, false, m, D, n, p.scale, s, kBlockK, kj, p.ks[2], T(1), dq + i0 * D, D);
      gemm(true, false, n, D, m, p.scale, s, kBlockK, qi, p.qs[2], T(1), dk + j0 * D, D);
    }
  }
}

template <typename T>
struct FwdProblem {
  const T *q, *k, *v;
  const T* w;                          // key weights [B, H, Tk] contiguous, or null
  int64_t qs[3], ks[3], vs[3], os[3];  // strides along (batch, head, row); os: of out
  T *o, *lse;                          // lse [B, H, Tq] contiguous
  int64_t B, H, G, Tq, Tk, D;
  bool causal;
  T scale;
};

// One (batch row, query head): per block of query rows, the online softmax over key blocks (a running row max m and
// sum l; the block's accumulator rescaled by exp(m_old − m_new) when the max moves), then out = acc / l and
// lse = m + log l (a row that sees no key: out 0, lse −inf).
template <typename T>
void forward_task(const FwdProblem<T>& p, const Gemm<T>& gemm, bool avx2, int64_t bh, std::vector<T>& s_buf,
                  std::vector<T>& acc_buf, std::vector<T>& m_row, std::vector<T>& l_row) {
  const int64_t b = bh / p.H, h = bh % p.H, hk = h / p.G, D = p.D;
  const T* q = p.q + b * p.qs[0] + h * p.qs[1];
  const T* k = p.k + b * p.ks[0] + hk * p.ks[1];
  const T* v = p.v + b * p.vs[0] + hk * p.vs[1];
  T* o = p.o + b * p.os[0] + h * p.os[1];
  T* lse = p.lse + (b * p.H + h) * p.Tq;
  const T* w = p.w == nullptr ? nullptr : p.w + (b * p.H + h) * p.Tk;
  const int64_t off = p.Tk - p.Tq;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T* s = s_buf.data();
  T* acc = acc_buf.data();
  for (int64_t i0 = 0; i0 < p.Tq; i0 += kBlockQ) {
    const int64_t m = std::min(kBlockQ, p.Tq - i0);
    const int64_t kend = p.causal ? std::min(p.Tk, i0 + m + off) : p.Tk;
    std::fill(m_row.begin(), m_row.begin() + m, neg_inf);
    std::fill(l_row.begin(), l_row.begin() + m, T(0));
    std::fill(acc, acc + m * D, T(0));
    for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
      const int64_t n = std::min(kBlockK, kend - j0);
      gemm(false, true, m, n, D, T(1), q + i0 * p.qs[2], p.qs[2], k + j0 * p.ks[2], p.ks[2], T(0), s, kBlockK);
      for (int64_t r = 0; r < m; ++r) {
        T* row = s + r * kBlockK;
        const int64_t seen = std::max<int64_t>(0, p.causal ? std::min(n, i0 + r + off + 1 - j0) : n);
        const T block_max = row_max(avx2, row, seen);
        // a NaN score makes the row's max, sum, output and lse NaN (as PyTorch's kernel gives them)
        const T m_new = std::isnan(block_max) || std::isnan(m_row[r]) ? std::numeric_limits<T>::quiet_NaN()
                                                                      : std::max(m_row[r], block_max * p.scale);
        if (m_new == neg_inf) {  // no key of this row so far
          std::fill(row, row + n, T(0));
          continue;
        }
        const T sum = row_exp_sum(avx2, row, seen, n, p.scale, m_new, w == nullptr ? nullptr : w + j0);
        if (!(m_new == m_row[r]) && m_row[r] != neg_inf) {
          const T alpha = std::exp(m_row[r] - m_new);
          l_row[r] *= alpha;
          for (int64_t d = 0; d < D; ++d) {
            acc[r * D + d] *= alpha;
          }
        }
        m_row[r] = m_new;
        l_row[r] += sum;
      }
      gemm(false, false, m, D, n, T(1), s, kBlockK, v + j0 * p.vs[2], p.vs[2], T(1), acc, D);
    }
    for (int64_t r = 0; r < m; ++r) {
      T* orow = o + (i0 + r) * p.os[2];
      const T l = l_row[r];
      const T inv = l == T(0) ? T(0) : T(1) / l;  // l = 0: no key seen; NaN stays NaN
      for (int64_t d = 0; d < D; ++d) {
        orow[d] = acc[r * D + d] * inv;
      }
      lse[i0 + r] = l == T(0) ? neg_inf : m_row[r] + std::log(l);
    }
  }
}

bool aten_gemm_forced() {
  const char* env = std::getenv("FASTATTN_ICL_CPU_GEMM");
  return env != nullptr && std::strcmp(env, "aten") == 0;
}

template <typename T>
Gemm<T> make_gemm() {
  return {aten_gemm_forced() ? nullptr : blas<T>(), at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value)};
}

template <typename T>
void run_backward(Problem<T>& p) {
  const Gemm<T> gemm = make_gemm<T>();
  const bool avx2 = avx2_usable(/*fma=*/true, /*f16c=*/false);
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s(kBlockQ * kBlockK), dp(kBlockQ * kBlockK), delta(kBlockQ);
    for (int64_t bh = begin; bh < end; ++bh) {
      backward_task(p, gemm, avx2, bh, s, dp, delta);
    }
  });
}

template <typename T>
void run_forward(FwdProblem<T>& p) {
  const Gemm<T> gemm = make_gemm<T>();
  const bool avx2 = avx2_usable(/*fma=*/true, /*f16c=*/false);
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s(kBlockQ * kBlockK), acc(kBlockQ * p.D), m_row(kBlockQ), l_row(kBlockQ);
    for (int64_t bh = begin; bh < end; ++bh) {
      forward_task(p, gemm, avx2, bh, s, acc, m_row, l_row);
    }
  });
}

void check_rows(const at::Tensor& x, const char* name, int64_t D, const char* op = "flash_attention_bwd") {
  TORCH_CHECK(x.dim() == 4 && x.size(3) == D, op, ": ", name, " must be [B, heads, T, ", D, "], got ", x.sizes());
}

// x, or a contiguous copy where BLAS cannot read its rows: a stride along D other than 1, or a row stride below D (an
// expanded gradient) or past a BLAS int; a single row's stride is not read.
at::Tensor blas_rows(const at::Tensor& x, int64_t D) {
  const int64_t ld = x.stride(2);
  const bool rows_ok = x.size(2) <= 1 || (ld >= D && ld <= std::numeric_limits<int>::max());
  return rows_ok && (D <= 1 || x.stride(3) == 1) ? x : x.contiguous();
}

// The (batch, head, row) strides of x [B, heads, T, D] as the tasks read them: a single row's row stride as D, which
// BLAS accepts as a leading dimension whatever x says.
void row_strides(const at::Tensor& x, int64_t* out, int64_t D) {
  for (int d = 0; d < 3; ++d) {
    out[d] = x.stride(d);
  }
  if (x.size(2) <= 1) {
    out[2] = std::max<int64_t>(D, 1);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_bwd(const at::Tensor& grad_out_in, const at::Tensor& q_in,
                                                                   const at::Tensor& k_in, const at::Tensor& v_in,
                                                                   const at::Tensor& out_in, const at::Tensor& lse,
                                                                   bool causal, double scale) {
  const int64_t D = q_in.size(-1);
  check_rows(q_in, "q", D);
  check_rows(k_in, "k", D);
  check_rows(v_in, "v", D);
  check_rows(out_in, "out", D);
  check_rows(grad_out_in, "grad_out", D);
  const at::Tensor q = blas_rows(q_in, D), k = blas_rows(k_in, D), v = blas_rows(v_in, D), out = blas_rows(out_in, D),
                   grad_out = blas_rows(grad_out_in, D);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Hkv = k.size(1), Tk = k.size(2);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "flash_attention_bwd: float32 or float64 inputs, got ", q.scalar_type());
  for (const at::Tensor* x : {&k, &v, &out, &grad_out, &lse}) {
    TORCH_CHECK(x->scalar_type() == q.scalar_type(), "flash_attention_bwd: every input must be ", q.scalar_type(),
                ", got ", x->scalar_type());
    TORCH_CHECK(x->device().is_cpu(), "flash_attention_bwd: CPU tensors only");
  }
  TORCH_CHECK(k.size(0) == B && v.sizes() == k.sizes() && out.sizes() == q.sizes() && grad_out.sizes() == q.sizes(),
              "flash_attention_bwd: q, out, grad_out [B, H, Tq, D] and k, v [B, Hkv, Tk, D] must agree");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "flash_attention_bwd: H = ", H, " is not a multiple of Hkv = ", Hkv);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == Tq,
              "flash_attention_bwd: lse must be [B, H, Tq], got ", lse.sizes());
  TORCH_CHECK(!causal || Tq <= Tk, "flash_attention_bwd: causal needs Tq <= Tk, got Tq = ", Tq, ", Tk = ", Tk);
  TORCH_CHECK(scale > 0, "flash_attention_bwd: scale must be positive, got ", scale);
  TORCH_CHECK(Tq < (int64_t(1) << 31) && Tk < (int64_t(1) << 31) && D < (int64_t(1) << 31),
              "flash_attention_bwd: lengths must fit a BLAS int");
  const int64_t G = H / Hkv;
  at::Tensor dq = at::zeros({B, H, Tq, D}, q.options());
  at::Tensor dk = at::zeros({B, G == 1 ? Hkv : H, Tk, D}, q.options());
  at::Tensor dv = at::zeros_like(dk);
  if (B * H * Tq * D == 0 || Tk == 0) {
    return {dq, dk.view({B, Hkv, G, Tk, D}).sum(2), dv.view({B, Hkv, G, Tk, D}).sum(2)};
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "flash_attention_bwd", [&] {
    Problem<scalar_t> p{};
    p.q = q.data_ptr<scalar_t>();
    p.k = k.data_ptr<scalar_t>();
    p.v = v.data_ptr<scalar_t>();
    p.o = out.data_ptr<scalar_t>();
    p.g = grad_out.data_ptr<scalar_t>();
    p.lse = lse.data_ptr<scalar_t>();
    row_strides(q, p.qs, D);
    row_strides(k, p.ks, D);
    row_strides(v, p.vs, D);
    row_strides(out, p.os, D);
    row_strides(grad_out, p.gs, D);
    for (int d = 0; d < 3; ++d) {
      p.ls[d] = lse.stride(d);
    }
    p.dq = dq.data_ptr<scalar_t>();
    p.dk = dk.data_ptr<scalar_t>();
    p.dv = dv.data_ptr<scalar_t>();
    p.B = B;
    p.H = H;
    p.G = G;
    p.Tq = Tq;
    p.Tk = Tk;
    p.D = D;
    p.causal = causal;
    p.dk_per_query_head = G > 1;
    p.scale = static_cast<scalar_t>(scale);
    run_backward(p);
  });
  if (G > 1) {
    dk = dk.view({B, Hkv, G, Tk, D}).sum(2);
    dv = dv.view({B, Hkv, G, Tk, D}).sum(2);
  }
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> flash_attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                       const at::Tensor& v_in, bool causal, double scale,
                                                       const std::optional<at::Tensor>& key_weights) {
  const char* op = "flash_attention_fwd";
  const int64_t D = q_in.size(-1);
  check_rows(q_in, "q", D, op);
  check_rows(k_in, "k", D, op);
  check_rows(v_in, "v", D, op);
  const at::Tensor q = blas_rows(q_in, D), k = blas_rows(k_in, D), v = blas_rows(v_in, D);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Hkv = k.size(1), Tk = k.size(2);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op, ": float32 or float64 inputs, got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share one dtype");
  TORCH_CHECK(k.size(0) == B && v.sizes() == k.sizes(), op, ": k and v must be [", B, ", Hkv, Tk, ", D, "]");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, op, ": H = ", H, " is not a multiple of Hkv = ", Hkv);
  TORCH_CHECK(!causal || Tq <= Tk, op, ": causal needs Tq <= Tk, got Tq = ", Tq, ", Tk = ", Tk);
  TORCH_CHECK(scale > 0, op, ": scale must be positive, got ", scale);
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(Tq < (int64_t(1) << 31) && Tk < (int64_t(1) << 31) && D < (int64_t(1) << 31), op,
              ": lengths must fit a BLAS int");
  at::Tensor w;
  if (key_weights.has_value()) {
    TORCH_CHECK(key_weights->scalar_type() == q.scalar_type() && key_weights->device().is_cpu() &&
                    key_weights->sizes() == at::IntArrayRef({B, H, Tk}),
                op, ": key_weights must be a CPU tensor [", B, ", ", H, ", ", Tk, "] of q's dtype, got ",
                key_weights->sizes(), " ", key_weights->scalar_type());
    w = key_weights->contiguous();
  }
  // the output laid out as fastattn_icl.ops._validate.output_like promises: as q when q is contiguous, else as
  // [B, Tq, H, D] memory
  at::Tensor out = q_in.is_contiguous() ? at::empty(q.sizes(), q.options())
                                        : at::empty({B, Tq, H, D}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({B, H, Tq}, q.options());
  if (B * H * Tq == 0) {
    return {out, lse};
  }
  if (Tk == 0 || D == 0) {  // every score 0: lse = log(keys seen), out 0
    out.zero_();
    at::Tensor seen = at::full({Tq}, static_cast<double>(Tk), q.options());
    if (causal) {
      seen = at::arange(Tk - Tq + 1, Tk + 1, q.options());
    }
    lse.copy_(seen.log().expand({B, H, Tq}));
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "flash_attention_fwd", [&] {
    FwdProblem<scalar_t> p{};
    p.q = q.data_ptr<scalar_t>();
    p.k = k.data_ptr<scalar_t>();
    p.v = v.data_ptr<scalar_t>();
    p.w = w.defined() ? w.data_ptr<scalar_t>() : nullptr;
    p.o = out.data_ptr<scalar_t>();
    p.lse = lse.data_ptr<scalar_t>();
    row_strides(q, p.qs, D);
    row_strides(k, p.ks, D);
    row_strides(v, p.vs, D);
    row_strides(out, p.os, D);
    p.B = B;
    p.H = H;
    p.G = H / Hkv;
    p.Tq = Tq;
    p.Tk = Tk;
    p.D = D;
    p.causal = causal;
    p.scale = static_cast<scalar_t>(scale);
    run_forward(p);
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn_icl, CPU, m) {
  m.impl("flash_attention_fwd", &flash_attention_fwd);
  m.impl("flash_attention_bwd", &flash_attention_bwd);
}

}  // namespace fastattn_icl
