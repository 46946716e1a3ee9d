// The method features of the CPU attention path, per query row, on top of PyTorch's CPU flash kernel
// (fastattn_icl/ops/_torch_backend.py; the math is docs/methods.md §1, §2, §3 and §6).
//
// Layouts (any strides, except unit strides along D, along Tk for the weight tables and the key mask, along Tq for
// isolation_limit; columns and reweight_from contiguous):
//   q, o, do, dq: [B, Hkv, G, Tq, D]   (query heads grouped by their kv head)   float32 or float64
//   k, v, dk, dv: [B, Hkv, Tk, D]                                             the same dtype as q
//   lse:          [B, Hkv, G, Tq] float32 (the unweighted log-sum-exp of the row; -inf: the row sees no key)
//   key_log_weights, dlogw: [B, Hkv, G, Tk] float32        key_padding_mask: bool [B, Tk] (true = keep) or None
//   reweight_from: int32 [B]   columns: int64 [A], ascending   isolation_limit: int32 [B, Tq]
// Query row i sits at key position i + Tk - Tq (bottom-right causal).
//
// anchor_correction_        o += Σ_a (w_a − 1) · P[i, a] · v_a over the anchor columns, rows i >= reweight_from[b],
//                           P = exp(s − lse) (docs/methods.md §2: post-softmax weights, unweighted denominator).
// anchor_backward_          the same rows' share of dq, dk, dv and d log w at the columns (the flash backward, run
//                           with the re-weighted output, carries the rest); rows with isolation_limit > 0 skipped.
// isolation_window_fwd_     a causal row with limit L > 0 is attention over its keys L .. i alone, when one of them is
//                           visible and the largest of their logits keeps exp(-1e4 − max) under the floor (then the
//                           isolated keys' probability is the exact 0 the dense rows give it). Checks every row and
//                           head first and writes nothing unless all pass; returns whether it wrote (bool scalar). A
//                           row whose logits hold a NaN, or whose limit is past its own position, fails the check.
// isolation_window_ok       that check alone (the backward asks before its flash pass).
// isolation_window_bwd_     the windowed rows' dq, dk, dv from their output gradient, output and lse.
// momentum_scan             y[r, t] = Σ_{i<t} η^(t−i) x[r, i] over x [R, T, D] (docs/methods.md §6), or over i > t.
// momentum_add_             that scan over v [B, Hkv, Tk, D] (padded keys as zero values) added into the last Tq
//                           positions' rows of o [B, Hkv, G, Tq, D] in place, without forming M; returns the state
//                           after the last key, [B, Hkv, D] (the momentum forward with no carried state).
//
// exp is floored as in the Python backend: an argument below exp_floor<T>() (less the re-weighting's headroom) gives
// 0, as exp of a number near -87 would be a float32 denormal, a slow path of the vectorised exp and of later matmuls;
// a NaN argument stays NaN. Work per call is O(rows · A · D) or O(rows · W · D) for W-key windows: at::parallel_for
// over rows in the forwards; over (b, kv head) in the backwards, so each task owns the dk/dv rows it adds to. An
// extension is compiled for the baseline ISA (SSE2), so each row body is also compiled with AVX2 + FMA intrinsics for
// its dot products and multiply-adds and chosen at run time, as in csrc/deep_thinking.cpp. The two bodies differ in
// rounding only (the order of a dot product's sum, fused or not), within the tolerance rule. The Python wrapper gives
// typed errors for bad input; the checks here (shapes, dtypes, the strides above) keep a direct call through
// torch.ops in bounds.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Context.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include "cpu_isa.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace fastattn_icl {

namespace {

constexpr double kIsolationValue = -1e4;  // docs/methods.md §3

template <typename T>
constexpr T exp_floor();
template <>
constexpr float exp_floor<float>() {
  return -72.0f;
}
template <>
constexpr double exp_floor<double>() {
  return -688.0;
}

// Multiply-adds per task before going parallel.
constexpr int64_t kGrainWork = int64_t{1} << 14;

// The baseline bodies' arithmetic (an extension is compiled for the baseline ISA: SSE2 at most).
struct Plain {
  template <typename T>
  static inline T dot(const T* a, const T* b, int64_t n) {
    T s = T(0);
    for (int64_t j = 0; j < n; ++j) {
      s += a[j] * b[j];
    }
    return s;
  }
  template <typename T>
  static inline void axpy(T* y, T a, const T* x, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
      y[j] += a * x[j];
    }
  }
  // y[0:D] += Σ_t c[t] · x[t][0:D]
  template <typename T>
  static inline void combine(T* y, const T* c, const T* const* x, int64_t n, int64_t D) {
    for (int64_t t = 0; t < n; ++t) {
      axpy(y, c[t], x[t], D);
    }
  }
};

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FASTATTN_ICL_X86 1
#define FASTATTN_ICL_AVX2_FMA __attribute__((target("avx2,fma")))
#define FASTATTN_ICL_INLINE inline __attribute__((always_inline))

// AVX2 and FMA on this CPU, and torch not told to stay below AVX2 (ATEN_CPU_CAPABILITY=default)
bool use_avx2() {
  static const bool yes = avx2_usable(/*fma=*/true, /*f16c=*/false);
  return yes;
}

// The AVX2 bodies' arithmetic: fused multiply-adds, two accumulators per dot product.
struct Avx2 {
  FASTATTN_ICL_AVX2_FMA static inline float dot(const float* a, const float* b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), acc1);
    }
    if (j + 8 <= n) {
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc0);
      j += 8;
    }
    acc0 = _mm256_add_ps(acc0, acc1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    float out = _mm_cvtss_f32(s);
    for (; j < n; ++j) {
      out = std::fma(a[j], b[j], out);
    }
    return out;
  }
  FASTATTN_ICL_AVX2_FMA static inline double dot(const double* a, const double* b, int64_t n) {
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      acc0 = _mm256_fmadd_pd(_mm256_loadu_pd(a + j), _mm256_loadu_pd(b + j), acc0);
      acc1 = _mm256_fmadd_pd(_mm256_loadu_pd(a + j + 4), _mm256_loadu_pd(b + j + 4), acc1);
    }
    acc0 = _mm256_add_pd(acc0, acc1);
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(acc0), _mm256_extractf128_pd(acc0, 1));
    double out = _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
    for (; j < n; ++j) {
      out = std::fma(a[j], b[j], out);
    }
    return out;
  }
  FASTATTN_ICL_AVX2_FMA static inline void axpy(float* y, float a, const float* x, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      _mm256_storeu_ps(y + j, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
    }
    for (; j < n; ++j) {
      y[j] = std::fma(a, x[j], y[j]);
    }
  }
  FASTATTN_ICL_AVX2_FMA static inline void axpy(double* y, double a, const double* x, int64_t n) {
    const __m256d va = _mm256_set1_pd(a);
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      _mm256_storeu_pd(y + j, _mm256_fmadd_pd(va, _mm256_loadu_pd(x + j), _mm256_loadu_pd(y + j)));
    }
    for (; j < n; ++j) {
      y[j] = std::fma(a, x[j], y[j]);
    }
  }
  // y[0:D] += Σ_t c[t] · x[t][0:D], y held in registers 32 floats at a time (no store-to-load chain through y)
  FASTATTN_ICL_AVX2_FMA static inline void combine(float* y, const float* c, const float* const* x, int64_t n,
                                                   int64_t D) {
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) {
      __m256 y0 = _mm256_loadu_ps(y + d), y1 = _mm256_loadu_ps(y + d + 8), y2 = _mm256_loadu_ps(y + d + 16),
             y3 = _mm256_loadu_ps(y + d + 24);
      for (int64_t t = 0; t < n; ++t) {
        const __m256 ct = _mm256_set1_ps(c[t]);
        const float* xt = x[t] + d;
        y0 = _mm256_fmadd_ps(ct, _mm256_loadu_ps(xt), y0);
        y1 = _mm256_fmadd_ps(ct, _mm256_loadu_ps(xt + 8), y1);
        y2 = _mm256_fmadd_ps(ct, _mm256_loadu_ps(xt + 16), y2);
        y3 = _mm256_fmadd_ps(ct, _mm256_loadu_ps(xt + 24), y3);
      }
      _mm256_storeu_ps(y + d, y0);
      _mm256_storeu_ps(y + d + 8, y1);
      _mm256_storeu_ps(y + d + 16, y2);
      _mm256_storeu_ps(y + d + 24, y3);
    }
    for (; d + 8 <= D; d += 8) {
      __m256 y0 = _mm256_loadu_ps(y + d);
      for (int64_t t = 0; t < n; ++t) {
        y0 = _mm256_fmadd_ps(_mm256_set1_ps(c[t]), _mm256_loadu_ps(x[t] + d), y0);
      }
      _mm256_storeu_ps(y + d, y0);
    }
    for (; d < D; ++d) {
      for (int64_t t = 0; t < n; ++t) {
        y[d] = std::fma(c[t], x[t][d], y[d]);
      }
    }
  }
  FASTATTN_ICL_AVX2_FMA static inline void combine(double* y, const double* c, const double* const* x, int64_t n,
                                                   int64_t D) {
    for (int64_t t = 0; t < n; ++t) {
      axpy(y, c[t], x[t], D);
    }
  }
};
#else
#define FASTATTN_ICL_X86 0
#define FASTATTN_ICL_AVX2_FMA
#define FASTATTN_ICL_INLINE inline
constexpr bool use_avx2() { return false; }
using Avx2 = Plain;
#endif

// A strided tensor of up to 5 dimensions: at(i0, ..., i3) for the leading indices.
template <typename T>
struct Strided {
  T* data;
  int64_t s[5] = {0, 0, 0, 0, 0};
  explicit Strided(const at::Tensor& t) : data(t.data_ptr<T>()) {
    for (int64_t d = 0; d < t.dim(); ++d) {
      s[d] = t.stride(d);
    }
  }
  T* at(int64_t a, int64_t b = 0, int64_t c = 0, int64_t d = 0) const {
    return data + a * s[0] + b * s[1] + c * s[2] + d * s[3];
  }
};

struct Geometry {
  int64_t B, Hkv, G, Tq, Tk, D;
  bool causal;
  const bool* kpm = nullptr;  // [B, Tk], row stride kpm_stride
  int64_t kpm_stride = 0;
  // One past the last key query row i may see.
  int64_t stop(int64_t i) const { return causal ? std::min(Tk, i + Tk - Tq + 1) : Tk; }
  bool kept(int64_t b, int64_t j) const { return kpm == nullptr || kpm[b * kpm_stride + j]; }
};

void check_rows(const at::Tensor& x, const char* name, const at::Tensor& like) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == like.scalar_type(), name, " must be a CPU tensor of ",
              like.scalar_type(), ", got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() >= 1 && (x.size(-1) <= 1 || x.stride(-1) == 1), name, " must have a unit stride along D");
}

Geometry geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& kpm, bool causal) {
  TORCH_CHECK(q.dim() == 5 && k.dim() == 4 && v.dim() == 4, "q must be [B, Hkv, G, Tq, D] and k, v [B, Hkv, Tk, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "q must be float32 or float64, got ",
              q.scalar_type());
  check_rows(q, "q", q);
  check_rows(k, "k", q);
  check_rows(v, "v", q);
  Geometry g{q.size(0), q.size(1), q.size(2), q.size(3), k.size(2), q.size(4), causal};
  TORCH_CHECK(k.size(0) == g.B && k.size(1) == g.Hkv && k.size(3) == g.D && v.sizes() == k.sizes(),
              "k and v must be [B, Hkv, Tk, D] of q's B, Hkv and D");
  TORCH_CHECK(!causal || g.Tq <= g.Tk, "causal rows need Tq <= Tk");
  if (kpm.has_value()) {
    TORCH_CHECK(kpm->scalar_type() == at::kBool && kpm->dim() == 2 && kpm->size(0) == g.B && kpm->size(1) == g.Tk &&
                    (g.Tk <= 1 || kpm->stride(1) == 1) && kpm->device().is_cpu(),
                "key_padding_mask must be a CPU bool tensor [B, Tk] with a unit stride along Tk");
    g.kpm = kpm->data_ptr<bool>();
    g.kpm_stride = kpm->stride(0);
  }
  return g;
}

void check_table(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef sizes) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.sizes() == sizes, name, " must be a CPU ", dtype,
              " tensor of shape ", sizes, ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// A table read or written as rows indexed by position: a unit stride along its last dimension as well.
void check_row_table(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef sizes) {
  check_table(t, name, dtype, sizes);
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must have a unit stride along its last dimension");
}

void check_same(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  check_rows(t, name, like);
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must have ", like_name, "'s shape ", like.sizes(), ", got ",
              t.sizes());
}

void check_columns(const at::Tensor& columns, int64_t Tk) {
  TORCH_CHECK(columns.device().is_cpu() && columns.scalar_type() == at::kLong && columns.dim() == 1 &&
                  columns.is_contiguous(),
              "columns must be a contiguous CPU int64 tensor [A]");
  const int64_t* c = columns.data_ptr<int64_t>();
  for (int64_t a = 0; a < columns.numel(); ++a) {
    TORCH_CHECK(c[a] >= 0 && c[a] < Tk && (a == 0 || c[a] > c[a - 1]),
                "columns must be ascending, distinct key positions in [0, Tk)");
  }
}

// --- anchor re-weighting ------------------------------------------------------------------------------------------

template <typename T>
struct Anchors {
  Geometry g;
  Strided<T> q, k, v, x;   // x: o (forward) or do (backward)
  Strided<float> lse;
  const int32_t* from;     // reweight_from [B]
  const int64_t* cols;     // [A]
  int64_t A;
  std::vector<T> gain;     // w − 1 at the columns, [B, H, A]
  std::vector<double> w;   // w at the columns, [B, H, A]
  T floor, scale;
  int64_t first;
};

template <typename T>
Anchors<T> anchors(const Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& x, const at::Tensor& lse, const at::Tensor& key_log_weights,
                   const at::Tensor& reweight_from, const at::Tensor& columns, double scale) {
  check_table(lse, "lse", at::kFloat, {g.B, g.Hkv, g.G, g.Tq});
  check_row_table(key_log_weights, "key_log_weights", at::kFloat, {g.B, g.Hkv, g.G, g.Tk});
  check_table(reweight_from, "reweight_from", at::kInt, {g.B});
  TORCH_CHECK(reweight_from.is_contiguous(), "reweight_from must be contiguous");
  check_columns(columns, g.Tk);
  Anchors<T> c{g, Strided<T>(q), Strided<T>(k), Strided<T>(v), Strided<T>(x), Strided<float>(lse),
               reweight_from.data_ptr<int32_t>(), columns.data_ptr<int64_t>(), columns.numel()};
  const Strided<float> logw(key_log_weights);
  const int64_t H = g.Hkv * g.G;
  c.gain.resize(g.B * H * c.A);
  c.w.resize(g.B * H * c.A);
  // max(0, the largest log-weight at the columns): a probability the weights lift by up to e^that must not be cut at
  // the plain floor
  float headroom = 0.0f;
  for (int64_t b = 0; b < g.B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const float* row = logw.at(b, h / g.G, h % g.G);
      for (int64_t a = 0; a < c.A; ++a) {
        const float lw = row[c.cols[a]];
        headroom = std::max(headroom, lw);
        c.gain[(b * H + h) * c.A + a] = static_cast<T>(std::expm1(lw));
        c.w[(b * H + h) * c.A + a] = std::exp(static_cast<double>(lw));
      }
    }
  }
  c.floor = exp_floor<T>() - static_cast<T>(headroom);
  c.scale = static_cast<T>(scale);
  c.first = g.Tq;
  for (int64_t b = 0; b < g.B; ++b) {
    TORCH_CHECK(c.from[b] >= 0, "reweight_from must be >= 0, got ", c.from[b]);
    c.first = std::min<int64_t>(c.first, c.from[b]);
  }
  return c;
}

// Tasks begin .. end of (b, h, row - first), in that order: o[b, h, row] += Σ_a (w_a − 1) · P[row, a] · v_a.
template <class Ops, typename T>
FASTATTN_ICL_INLINE void correction_rows(const Anchors<T>& c, int64_t begin, int64_t end) {
  const Geometry& g = c.g;
  const int64_t H = g.Hkv * g.G, n = g.Tq - c.first;
  std::vector<T> coef(c.A), term(c.A);
  std::vector<const T*> rows(c.A);
  // the task's indices, counted up rather than divided out per task
  int64_t b = begin / (H * n), h = (begin / n) % H, i = c.first + begin % n;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t hk = h / g.G, gi = h % g.G;
    if (i >= c.from[b]) {
      const T* qi = c.q.at(b, hk, gi, i);
      const T lse = static_cast<T>(*c.lse.at(b, hk, gi, i));
      const T* gain = c.gain.data() + (b * H + h) * c.A;
      const int64_t stop = g.stop(i);
      int64_t m = 0;  // the columns with a nonzero term: their logits, then coefficients, and value rows
      for (int64_t a = 0; a < c.A && c.cols[a] < stop; ++a) {
        const int64_t j = c.cols[a];
        if (!g.kept(b, j)) {
          continue;
        }
        const T x = Ops::dot(qi, c.k.at(b, hk, j), g.D) * c.scale - lse;
        if (!(x < c.floor)) {  // NaN stays NaN
          coef[m] = x;
          term[m] = gain[a];
          rows[m++] = c.v.at(b, hk, j);
        }
      }
      for (int64_t t = 0; t < m; ++t) {
        coef[t] = std::exp(coef[t]) * term[t];
      }
      Ops::combine(c.x.at(b, hk, gi, i), coef.data(), rows.data(), m, g.D);
    }
    if (++i == g.Tq) {
      i = c.first;
      if (++h == H) {
        h = 0;
        ++b;
      }
    }
  }
}

// Grads of the re-weighted rows of one (b, kv head) per task: dq, dk, dv through the columns, d log w at them.
template <class Ops, typename T>
FASTATTN_ICL_INLINE void anchor_grad_rows(const Anchors<T>& c, const Strided<T>& dq, const Strided<T>& dk,
                                          const Strided<T>& dv, const Strided<float>& dlogw, const int32_t* iso,
                                          int64_t iso_stride, int64_t begin, int64_t end) {
  const Geometry& g = c.g;
  const int64_t H = g.Hkv * g.G;
  std::vector<double> dw(c.A);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / g.Hkv, hk = task % g.Hkv;
    for (int64_t gi = 0; gi < g.G; ++gi) {
      const int64_t h = hk * g.G + gi;
      const T* gain = c.gain.data() + (b * H + h) * c.A;
      const double* w = c.w.data() + (b * H + h) * c.A;
      std::fill(dw.begin(), dw.end(), 0.0);
      for (int64_t i = c.from[b]; i < g.Tq; ++i) {
        if (iso != nullptr && iso[b * iso_stride + i] > 0) {  // the exact rows carry an isolated row's share
          continue;
        }
        const T* qi = c.q.at(b, hk, gi, i);
        const T* doi = c.x.at(b, hk, gi, i);
        T* dqi = dq.at(b, hk, gi, i);
        const T lse = static_cast<T>(*c.lse.at(b, hk, gi, i));
        const int64_t stop = g.stop(i);
        for (int64_t a = 0; a < c.A && c.cols[a] < stop; ++a) {
          const int64_t j = c.cols[a];
          if (!g.kept(b, j)) {
            continue;
          }
          const T x = Ops::dot(qi, c.k.at(b, hk, j), g.D) * c.scale - lse;
          if (x < c.floor) {
            continue;
          }
          const T p = std::exp(x);
          const T pd = p * Ops::dot(doi, c.v.at(b, hk, j), g.D);
          dw[a] += static_cast<double>(pd) * w[a];
          const T ds = pd * gain[a];
          Ops::axpy(dqi, ds * c.scale, c.k.at(b, hk, j), g.D);
          Ops::axpy(dk.at(b, hk, j), ds * c.scale, qi, g.D);
          Ops::axpy(dv.at(b, hk, j), p * gain[a], doi, g.D);
        }
      }
      float* dw_row = dlogw.at(b, hk, gi);
      for (int64_t a = 0; a < c.A; ++a) {
        dw_row[c.cols[a]] += static_cast<float>(dw[a]);
      }
    }
  }
}

// Each row body twice: compiled for the baseline ISA and for AVX2 + FMA (chosen at run time by use_avx2()).
template <typename T>
FASTATTN_ICL_AVX2_FMA void correction_avx2(const Anchors<T>& c, int64_t begin, int64_t end) {
  correction_rows<Avx2>(c, begin, end);
}
template <typename T>
void correction_plain(const Anchors<T>& c, int64_t begin, int64_t end) {
  correction_rows<Plain>(c, begin, end);
}
template <typename T>
FASTATTN_ICL_AVX2_FMA void anchor_grad_avx2(const Anchors<T>& c, const Strided<T>& dq, const Strided<T>& dk,
                                            const Strided<T>& dv, const Strided<float>& dlogw, const int32_t* iso,
                                            int64_t iso_stride, int64_t begin, int64_t end) {
  anchor_grad_rows<Avx2>(c, dq, dk, dv, dlogw, iso, iso_stride, begin, end);
}
template <typename T>
void anchor_grad_plain(const Anchors<T>& c, const Strided<T>& dq, const Strided<T>& dk, const Strided<T>& dv,
                       const Strided<float>& dlogw, const int32_t* iso, int64_t iso_stride, int64_t begin,
                       int64_t end) {
  anchor_grad_rows<Plain>(c, dq, dk, dv, dlogw, iso, iso_stride, begin, end);
}

void anchor_correction_(const at::Tensor& o, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
                        const at::Tensor& key_log_weights, const at::Tensor& reweight_from, const at::Tensor& columns,
                        bool causal, double scale) {
  const Geometry g = geometry(q, k, v, key_padding_mask, causal);
  check_same(o, "o", q, "q");
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "anchor_correction_", [&] {
    const Anchors<scalar_t> c = anchors<scalar_t>(g, q, k, v, o, lse, key_log_weights, reweight_from, columns, scale);
    const int64_t tasks = g.B * g.Hkv * g.G * (g.Tq - c.first);
    if (tasks <= 0 || c.A == 0) {
      return;
    }
    const bool avx2 = use_avx2();
    at::parallel_for(0, tasks, std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, c.A * g.D)),
                     [&](int64_t begin, int64_t end) {
                       avx2 ? correction_avx2(c, begin, end) : correction_plain(c, begin, end);
                     });
  });
}

void anchor_backward_(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& dlogw,
                      const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& grad_out,
                      const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
                      const at::Tensor& key_log_weights, const at::Tensor& reweight_from,
                      const std::optional<at::Tensor>& isolation_limit, const at::Tensor& columns, bool causal,
                      double scale) {
  const Geometry g = geometry(q, k, v, key_padding_mask, causal);
  check_same(dq, "dq", q, "q");
  check_same(grad_out, "grad_out", q, "q");
  check_same(dk, "dk", k, "k");
  check_same(dv, "dv", k, "k");
  check_row_table(dlogw, "dlogw", at::kFloat, {g.B, g.Hkv, g.G, g.Tk});
  const int32_t* iso = nullptr;
  int64_t iso_stride = 0;
  if (isolation_limit.has_value()) {
    check_row_table(*isolation_limit, "isolation_limit", at::kInt, {g.B, g.Tq});
    iso = isolation_limit->data_ptr<int32_t>();
    iso_stride = isolation_limit->stride(0);
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "anchor_backward_", [&] {
    const Anchors<scalar_t> c =
        anchors<scalar_t>(g, q, k, v, grad_out, lse, key_log_weights, reweight_from, columns, scale);
    if (c.A == 0) {
      return;
    }
    const Strided<scalar_t> DQ(dq), DK(dk), DV(dv);
    const Strided<float> DW(dlogw);
    const bool avx2 = use_avx2();
    // one task per (batch row, kv head): it alone adds to that head's dk, dv rows and its query heads' dq, dlogw
    at::parallel_for(0, g.B * g.Hkv, 1, [&](int64_t begin, int64_t end) {
      avx2 ? anchor_grad_avx2(c, DQ, DK, DV, DW, iso, iso_stride, begin, end)
           : anchor_grad_plain(c, DQ, DK, DV, DW, iso, iso_stride, begin, end);
    });
  });
}

// --- isolation windows --------------------------------------------------------------------------------------------

template <typename T>
struct Windows {
  Geometry g;
  Strided<T> q, k;
  const int32_t* limit;  // [B, Tq]
  int64_t limit_stride;
  T scale;
  int64_t start(int64_t b, int64_t i) const { return limit[b * limit_stride + i]; }
};

template <typename T>
Windows<T> windows(const Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& isolation_limit,
                   double scale) {
  check_row_table(isolation_limit, "isolation_limit", at::kInt, {g.B, g.Tq});
  return Windows<T>{g, Strided<T>(q), Strided<T>(k), isolation_limit.data_ptr<int32_t>(), isolation_limit.stride(0),
                    static_cast<T>(scale)};
}

// The scaled logits of row i (query head gi of kv head hk) at its window keys start .. stop - 1 into s (-inf at
// padding); returns their max (-inf: no window key is visible; NaN: a logit is NaN).
template <class Ops, typename T>
FASTATTN_ICL_INLINE T window_logits(const Windows<T>& c, int64_t b, int64_t hk, int64_t gi, int64_t i, int64_t start,
                                    int64_t stop, T* s) {
  const T* qi = c.q.at(b, hk, gi, i);
  T top = -std::numeric_limits<T>::infinity();
  bool nan = false;
  for (int64_t j = start; j < stop; ++j) {
    const T x = c.g.kept(b, j) ? Ops::dot(qi, c.k.at(b, hk, j), c.g.D) * c.scale : -std::numeric_limits<T>::infinity();
    s[j - start] = x;
    top = std::max(top, x);
    nan |= std::isnan(x);
  }
  return nan ? std::numeric_limits<T>::quiet_NaN() : top;
}

// Rows (b, i) begin .. end: whether every head of every windowed row has a visible window key whose logit keeps the
// isolated keys' exp(-1e4 − max) under the floor; and, when o is given, its output and lse written.
template <class Ops, typename T>
FASTATTN_ICL_INLINE bool window_rows(const Windows<T>& c, const Strided<T>* v, const Strided<T>* o,
                                     const Strided<float>* lse, int64_t begin, int64_t end) {
  const Geometry& g = c.g;
  const T least = static_cast<T>(kIsolationValue) - exp_floor<T>();
  std::vector<T> s;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / g.Tq, i = task % g.Tq, start = c.start(b, i), stop = g.stop(i);
    if (start <= 0) {
      continue;
    }
    if (start >= stop) {  // a limit past the row's own position: no window (the exact rows serve it)
      return false;
    }
    s.resize(stop - start);
    for (int64_t h = 0; h < g.Hkv * g.G; ++h) {
      const int64_t hk = h / g.G, gi = h % g.G;
      const T top = window_logits<Ops>(c, b, hk, gi, i, start, stop, s.data());
      if (!(top > least)) {
        return false;
      }
      if (o == nullptr) {
        continue;
      }
      T sum = T(0);
      for (T& x : s) {
        const T y = x - top;
        x = y < exp_floor<T>() ? T(0) : std::exp(y);
        sum += x;
      }
      T* oi = o->at(b, hk, gi, i);
      std::fill(oi, oi + g.D, T(0));
      for (int64_t j = start; j < stop; ++j) {
        if (s[j - start] != T(0)) {
          Ops::axpy(oi, s[j - start] / sum, v->at(b, hk, j), g.D);
        }
      }
      *lse->at(b, hk, gi, i) = static_cast<float>(top + std::log(sum));
    }
  }
  return true;
}

// The windowed rows' dq, dk, dv of one (b, kv head) per task.
template <class Ops, typename T>
FASTATTN_ICL_INLINE void window_grad_rows(const Windows<T>& c, const Strided<T>& v, const Strided<T>& dout,
                                          const Strided<T>& o, const Strided<float>& lse, const Strided<T>& dq,
                                          const Strided<T>& dk, const Strided<T>& dv, int64_t begin, int64_t end) {
  const Geometry& g = c.g;
  std::vector<T> s;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / g.Hkv, hk = task % g.Hkv;
    for (int64_t i = 0; i < g.Tq; ++i) {
      const int64_t start = c.start(b, i), stop = g.stop(i);
      if (start <= 0 || start >= stop) {  // the check (window_rows) failed such a row: never reached
        continue;
      }
      s.resize(stop - start);
      for (int64_t gi = 0; gi < g.G; ++gi) {
        window_logits<Ops>(c, b, hk, gi, i, start, stop, s.data());
        const T row_lse = static_cast<T>(*lse.at(b, hk, gi, i));
        const T* qi = c.q.at(b, hk, gi, i);
        const T* doi = dout.at(b, hk, gi, i);
        const T delta = Ops::dot(doi, o.at(b, hk, gi, i), g.D);
        T* dqi = dq.at(b, hk, gi, i);
        for (int64_t j = start; j < stop; ++j) {
          const T x = s[j - start] - row_lse;
          if (x < exp_floor<T>()) {
            continue;
          }
          const T p = std::exp(x);
          const T ds = p * (Ops::dot(doi, v.at(b, hk, j), g.D) - delta);
          Ops::axpy(dqi, ds * c.scale, c.k.at(b, hk, j), g.D);
          Ops::axpy(dk.at(b, hk, j), ds * c.scale, qi, g.D);
          Ops::axpy(dv.at(b, hk, j), p, doi, g.D);
        }
      }
    }
  }
}

template <typename T>
FASTATTN_ICL_AVX2_FMA bool window_avx2(const Windows<T>& c, const Strided<T>* v, const Strided<T>* o,
                                       const Strided<float>* lse, int64_t begin, int64_t end) {
  return window_rows<Avx2>(c, v, o, lse, begin, end);
}
template <typename T>
bool window_plain(const Windows<T>& c, const Strided<T>* v, const Strided<T>* o, const Strided<float>* lse,
                  int64_t begin, int64_t end) {
  return window_rows<Plain>(c, v, o, lse, begin, end);
}
template <typename T>
FASTATTN_ICL_AVX2_FMA void window_grad_avx2(const Windows<T>& c, const Strided<T>& v, const Strided<T>& dout,
                                            const Strided<T>& o, const Strided<float>& lse, const Strided<T>& dq,
                                            const Strided<T>& dk, const Strided<T>& dv, int64_t begin, int64_t end) {
  window_grad_rows<Avx2>(c, v, dout, o, lse, dq, dk, dv, begin, end);
}
template <typename T>
void window_grad_plain(const Windows<T>& c, const Strided<T>& v, const Strided<T>& dout, const Strided<T>& o,
                       const Strided<float>& lse, const Strided<T>& dq, const Strided<T>& dk, const Strided<T>& dv,
                       int64_t begin, int64_t end) {
  window_grad_rows<Plain>(c, v, dout, o, lse, dq, dk, dv, begin, end);
}

// Every windowed row checked (o == nullptr) or checked and written; false as soon as one row fails the check.
template <typename T>
bool run_windows(const Windows<T>& c, const Strided<T>* v, const Strided<T>* o, const Strided<float>* lse) {
  const Geometry& g = c.g;
  std::atomic<bool> ok{true};
  const bool avx2 = use_avx2();
  at::parallel_for(0, g.B * g.Tq, std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, g.Hkv * g.G * g.D)),
                   [&](int64_t begin, int64_t end) {
                     if (ok.load(std::memory_order_relaxed) &&
                         !(avx2 ? window_avx2(c, v, o, lse, begin, end) : window_plain(c, v, o, lse, begin, end))) {
                       ok.store(false, std::memory_order_relaxed);
                     }
                   });
  return ok.load();
}

at::Tensor isolation_window_ok(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& kpm,
                               const at::Tensor& isolation_limit, double scale) {
  const Geometry g = geometry(q, k, k, kpm, true);
  bool ok = false;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "isolation_window_ok", [&] {
    ok = run_windows<scalar_t>(windows<scalar_t>(g, q, k, isolation_limit, scale), nullptr, nullptr, nullptr);
  });
  return at::scalar_tensor(ok, at::TensorOptions().dtype(at::kBool));
}

at::Tensor isolation_window_fwd_(const at::Tensor& o, const at::Tensor& lse, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const std::optional<at::Tensor>& kpm,
                                 const at::Tensor& isolation_limit, double scale) {
  const Geometry g = geometry(q, k, v, kpm, true);
  check_same(o, "o", q, "q");
  check_table(lse, "lse", at::kFloat, {g.B, g.Hkv, g.G, g.Tq});
  bool ok = false;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "isolation_window_fwd_", [&] {
    const Windows<scalar_t> c = windows<scalar_t>(g, q, k, isolation_limit, scale);
    const Strided<scalar_t> V(v), O(o);
    const Strided<float> LSE(lse);
    // checked first, written only when every row passes: the exact rows then serve the call from the flash result
    ok = run_windows<scalar_t>(c, nullptr, nullptr, nullptr) && run_windows<scalar_t>(c, &V, &O, &LSE);
  });
  return at::scalar_tensor(ok, at::TensorOptions().dtype(at::kBool));
}

void isolation_window_bwd_(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& q,
                           const at::Tensor& k, const at::Tensor& v, const at::Tensor& grad_out, const at::Tensor& o,
                           const at::Tensor& lse, const std::optional<at::Tensor>& kpm,
                           const at::Tensor& isolation_limit, double scale) {
  const Geometry g = geometry(q, k, v, kpm, true);
  check_same(dq, "dq", q, "q");
  check_same(grad_out, "grad_out", q, "q");
  check_same(o, "o", q, "q");
  check_same(dk, "dk", k, "k");
  check_same(dv, "dv", k, "k");
  check_table(lse, "lse", at::kFloat, {g.B, g.Hkv, g.G, g.Tq});
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "isolation_window_bwd_", [&] {
    const Windows<scalar_t> c = windows<scalar_t>(g, q, k, isolation_limit, scale);
    const Strided<scalar_t> V(v), DO(grad_out), O(o), DQ(dq), DK(dk), DV(dv);
    const Strided<float> LSE(lse);
    const bool avx2 = use_avx2();
    // one task per (batch row, kv head): it alone adds to that head's dk, dv rows
    at::parallel_for(0, g.B * g.Hkv, 1, [&](int64_t begin, int64_t end) {
      avx2 ? window_grad_avx2(c, V, DO, O, LSE, DQ, DK, DV, begin, end)
           : window_grad_plain(c, V, DO, O, LSE, DQ, DK, DV, begin, end);
    });
  });
}

// --- the momentum scan -------------------------------------------------------------------------------------------

// y[r, t] = Σ_{i<t} η^(t−i) x[r, i] (reverse: Σ_{i>t} η^(i−t) x[r, i]) by the recurrence acc <- η·(acc + x_t), in
// float64 whatever the dtype, rounded once per output; values below the output dtype's smallest normal number are
// stored as 0 (a denormal changes no sum, but slows every later product), and a float64 state below 1e-290 is set to
// 0 (before it becomes a float64 denormal); NaN and infinities propagate.
template <typename T>
FASTATTN_ICL_INLINE T scan_output(double acc) {  // the sum rounded once, below the dtype's smallest normal 0
  return std::abs(acc) < static_cast<double>(std::numeric_limits<T>::min()) ? T(0) : static_cast<T>(acc);  // NaN stays
}
FASTATTN_ICL_INLINE double scan_step(double acc, double x, double eta) {  // acc <- η·(acc + x), flushed near 1e-290
  const double next = eta * (acc + x);
  return std::abs(next) < 1e-290 ? 0.0 : next;
}
template <typename T>
FASTATTN_ICL_INLINE void scan_rows(const T* x, T* y, int64_t T_len, int64_t D, int64_t d0, int64_t d1, double eta,
                                   bool reverse) {
  constexpr int64_t kBlock = 64;
  double acc[kBlock];
  for (int64_t d = d0; d < d1; d += kBlock) {
    const int64_t n = std::min(kBlock, d1 - d);
    std::fill(acc, acc + n, 0.0);
    for (int64_t s = 0; s < T_len; ++s) {
      const int64_t t = reverse ? T_len - 1 - s : s;
      const T* xt = x + t * D + d;
      T* yt = y + t * D + d;
      for (int64_t l = 0; l < n; ++l) {
        yt[l] = scan_output<T>(acc[l]);
        acc[l] = scan_step(acc[l], static_cast<double>(xt[l]), eta);
      }
    }
  }
}
template <typename T>
FASTATTN_ICL_AVX2_FMA void scan_avx2(const T* x, T* y, int64_t T_len, int64_t D, int64_t d0, int64_t d1, double eta,
                                     bool reverse) {
  scan_rows(x, y, T_len, D, d0, d1, eta, reverse);
}
#if FASTATTN_ICL_X86
// scan_output<float> and scan_step on four columns (a mask of the values to flush, |x| < tiny: false for NaN)
FASTATTN_ICL_AVX2_FMA inline __m128 scan_output_ps(__m256d acc) {
  const __m256d flushed = _mm256_cmp_pd(_mm256_andnot_pd(_mm256_set1_pd(-0.0), acc),
                                        _mm256_set1_pd(std::numeric_limits<float>::min()), _CMP_LT_OQ);
  return _mm256_cvtpd_ps(_mm256_andnot_pd(flushed, acc));
}
FASTATTN_ICL_AVX2_FMA inline __m256d scan_step_pd(__m256d acc, __m256d x, __m256d eta) {
  const __m256d next = _mm256_mul_pd(eta, _mm256_add_pd(acc, x));
  const __m256d tiny = _mm256_cmp_pd(_mm256_andnot_pd(_mm256_set1_pd(-0.0), next), _mm256_set1_pd(1e-290), _CMP_LT_OQ);
  return _mm256_andnot_pd(tiny, next);
}
// float32: 16 columns at a time in four float64 vectors (the same operations as scan_rows, in vector registers)
template <>
FASTATTN_ICL_AVX2_FMA void scan_avx2<float>(const float* x, float* y, int64_t T_len, int64_t D, int64_t d0, int64_t d1,
                                            double eta, bool reverse) {
  const __m256d veta = _mm256_set1_pd(eta);
  int64_t d = d0;
  for (; d + 16 <= d1; d += 16) {
    __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
    for (int64_t s = 0; s < T_len; ++s) {
      const int64_t t = reverse ? T_len - 1 - s : s;
      const float* xt = x + t * D + d;
      float* yt = y + t * D + d;
      for (int l = 0; l < 4; ++l) {
        _mm_storeu_ps(yt + 4 * l, scan_output_ps(acc[l]));
        acc[l] = scan_step_pd(acc[l], _mm256_cvtps_pd(_mm_loadu_ps(xt + 4 * l)), veta);
      }
    }
  }
  if (d < d1) {
    scan_rows(x, y, T_len, D, d, d1, eta, reverse);
  }
}
#endif
template <typename T>
void scan_plain(const T* x, T* y, int64_t T_len, int64_t D, int64_t d0, int64_t d1, double eta, bool reverse) {
  scan_rows(x, y, T_len, D, d0, d1, eta, reverse);
}

at::Tensor momentum_scan(const at::Tensor& x, double eta, bool reverse) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) && x.dim() == 3,
              "x must be a CPU float32 or float64 tensor [R, T, D], got ", x.scalar_type(), " ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(std::isfinite(eta), "eta must be finite, got ", eta);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t R = xc.size(0), T_len = xc.size(1), D = xc.size(2);
  if (y.numel() == 0) {
    return y;
  }
  constexpr int64_t kColumns = 64;  // columns per task: a row of many columns still spreads over the threads
  const int64_t blocks = (D + kColumns - 1) / kColumns;
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "momentum_scan", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, R * blocks, std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, T_len * kColumns)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t task = begin; task < end; ++task) {
                         const int64_t r = task / blocks, d0 = (task % blocks) * kColumns;
                         const int64_t d1 = std::min(D, d0 + kColumns);
                         avx2 ? scan_avx2(xp + r * T_len * D, yp + r * T_len * D, T_len, D, d0, d1, eta, reverse)
                              : scan_plain(xp + r * T_len * D, yp + r * T_len * D, T_len, D, d0, d1, eta, reverse);
                       }
                     });
  });
  return y;
}

// out[b, h, g, t − first] += M_t for every query head g of kv head h and every position t >= first = Tk − Tq, with
// M_t = Σ_{i<t} η^(t−i) v_i·keep_i formed as momentum_scan forms it (float64 state, M rounded once and flushed below
// the dtype's smallest normal number), then added in the output's dtype, as the separate scan and add rounded it;
// returns the state after the last position, η (M_(Tk−1) + v_(Tk−1)·keep), rounded once. v·keep is the product in
// the dtype (a NaN value at a padded key stays NaN, as in the Python term).
template <typename T>
FASTATTN_ICL_INLINE void scan_add_rows(const T* v, int64_t v_t, const bool* keep, T* out, int64_t G, int64_t out_g,
                                       int64_t out_t, int64_t T_len, int64_t first, int64_t d0, int64_t d1, double eta,
                                       T* state) {
  constexpr int64_t kBlock = 64;
  double acc[kBlock];
  T m[kBlock];
  for (int64_t d = d0; d < d1; d += kBlock) {
    const int64_t n = std::min(kBlock, d1 - d);
    std::fill(acc, acc + n, 0.0);
    for (int64_t t = 0; t < T_len; ++t) {
      if (t >= first) {
        for (int64_t l = 0; l < n; ++l) {
          m[l] = scan_output<T>(acc[l]);
        }
        T* ot = out + (t - first) * out_t + d;
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t l = 0; l < n; ++l) {
            ot[g * out_g + l] += m[l];
          }
        }
      }
      const T kept = keep == nullptr || keep[t] ? T(1) : T(0);
      const T* xt = v + t * v_t + d;
      for (int64_t l = 0; l < n; ++l) {
        acc[l] = scan_step(acc[l], static_cast<double>(xt[l] * kept), eta);
      }
    }
    for (int64_t l = 0; l < n; ++l) {
      state[d + l] = scan_output<T>(acc[l]);
    }
  }
}
template <typename T>
FASTATTN_ICL_AVX2_FMA void scan_add_avx2(const T* v, int64_t v_t, const bool* keep, T* out, int64_t G, int64_t out_g,
                                         int64_t out_t, int64_t T_len, int64_t first, int64_t d0, int64_t d1,
                                         double eta, T* state) {
  scan_add_rows(v, v_t, keep, out, G, out_g, out_t, T_len, first, d0, d1, eta, state);
}
#if FASTATTN_ICL_X86
// float32: 16 columns at a time in four float64 vectors (the same operations as scan_add_rows, in vector registers)
template <>
FASTATTN_ICL_AVX2_FMA void scan_add_avx2<float>(const float* v, int64_t v_t, const bool* keep, float* out, int64_t G,
                                                int64_t out_g, int64_t out_t, int64_t T_len, int64_t first, int64_t d0,
                                                int64_t d1, double eta, float* state) {
  const __m256d veta = _mm256_set1_pd(eta);
  int64_t d = d0;
  for (; d + 16 <= d1; d += 16) {
    __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
    for (int64_t t = 0; t < T_len; ++t) {
      if (t >= first) {
        float* ot = out + (t - first) * out_t + d;
        for (int l = 0; l < 4; ++l) {
          const __m128 m = scan_output_ps(acc[l]);
          for (int64_t g = 0; g < G; ++g) {
            float* og = ot + g * out_g + 4 * l;
            _mm_storeu_ps(og, _mm_add_ps(_mm_loadu_ps(og), m));
          }
        }
      }
      const __m128 kept = _mm_set1_ps(keep == nullptr || keep[t] ? 1.0f : 0.0f);
      const float* xt = v + t * v_t + d;
      for (int l = 0; l < 4; ++l) {
        acc[l] = scan_step_pd(acc[l], _mm256_cvtps_pd(_mm_mul_ps(_mm_loadu_ps(xt + 4 * l), kept)), veta);
      }
    }
    for (int l = 0; l < 4; ++l) {
      _mm_storeu_ps(state + d + 4 * l, scan_output_ps(acc[l]));
    }
  }
  if (d < d1) {
    scan_add_rows(v, v_t, keep, out, G, out_g, out_t, T_len, first, d, d1, eta, state);
  }
}
#endif
template <typename T>
void scan_add_plain(const T* v, int64_t v_t, const bool* keep, T* out, int64_t G, int64_t out_g, int64_t out_t,
                    int64_t T_len, int64_t first, int64_t d0, int64_t d1, double eta, T* state) {
  scan_add_rows(v, v_t, keep, out, G, out_g, out_t, T_len, first, d0, d1, eta, state);
}

at::Tensor momentum_add_(at::Tensor& out, const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask,
                         double eta) {
  TORCH_CHECK(out.device().is_cpu() && (out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble) &&
                  out.dim() == 5 && (out.size(4) <= 1 || out.stride(4) == 1),
              "out must be a CPU float32 or float64 tensor [B, Hkv, G, Tq, D] with a unit stride along D, got ",
              out.scalar_type(), " ", out.sizes(), " on ", out.device());
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == out.scalar_type() && v.dim() == 4 &&
                  (v.size(3) <= 1 || v.stride(3) == 1),
              "v must be a CPU tensor [B, Hkv, Tk, D] of out's dtype with a unit stride along D, got ", v.scalar_type(),
              " ", v.sizes());
  at::assert_no_internal_overlap(out);  // an expanded o would add one row's term several times (and race)
  const int64_t B = out.size(0), Hkv = out.size(1), G = out.size(2), Tq = out.size(3), D = out.size(4);
  const int64_t Tk = v.size(2);
  TORCH_CHECK(v.size(0) == B && v.size(1) == Hkv && v.size(3) == D && Tq <= Tk,
              "v must be [B, Hkv, Tk, D] with Tk >= Tq for out ", out.sizes(), ", got ", v.sizes());
  TORCH_CHECK(std::isfinite(eta), "eta must be finite, got ", eta);
  const bool* keep = nullptr;
  int64_t keep_b = 0;
  if (key_padding_mask.has_value()) {
    const at::Tensor& kpm = *key_padding_mask;
    TORCH_CHECK(kpm.device().is_cpu() && kpm.scalar_type() == at::kBool && kpm.dim() == 2 && kpm.size(0) == B &&
                    kpm.size(1) == Tk && (Tk <= 1 || kpm.stride(1) == 1),
                "key_padding_mask must be a CPU bool tensor [B, Tk] with a unit stride along Tk");
    keep = kpm.data_ptr<bool>();
    keep_b = kpm.stride(0);
  }
  at::Tensor state = at::empty({B, Hkv, D}, v.options());
  if (state.numel() == 0) {
    return state;
  }
  constexpr int64_t kColumns = 64;  // columns per task, as momentum_scan
  const int64_t blocks = (D + kColumns - 1) / kColumns;
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "momentum_add_", [&] {
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* sp = state.data_ptr<scalar_t>();
    at::parallel_for(
        0, B * Hkv * blocks, std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, Tk * kColumns * (1 + G))),
        [&](int64_t begin, int64_t end) {
          for (int64_t task = begin; task < end; ++task) {
            const int64_t bh = task / blocks, b = bh / Hkv, h = bh % Hkv, d0 = (task % blocks) * kColumns;
            const int64_t d1 = std::min(D, d0 + kColumns);
            const scalar_t* vr = vp + b * v.stride(0) + h * v.stride(1);
            scalar_t* orow = op + b * out.stride(0) + h * out.stride(1);
            const bool* kr = keep == nullptr ? nullptr : keep + b * keep_b;
            scalar_t* st = sp + bh * D;
            avx2 ? scan_add_avx2(vr, v.stride(2), kr, orow, G, out.stride(2), out.stride(3), Tk, Tk - Tq, d0, d1, eta,
                                 st)
                 : scan_add_plain(vr, v.stride(2), kr, orow, G, out.stride(2), out.stride(3), Tk, Tk - Tq, d0, d1, eta,
                                  st);
          }
        });
  });
  return state;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn_icl, CPU, m) {
  m.impl("anchor_correction_", &anchor_correction_);
  m.impl("anchor_backward_", &anchor_backward_);
  m.impl("isolation_window_ok", &isolation_window_ok);
  m.impl("isolation_window_fwd_", &isolation_window_fwd_);
  m.impl("isolation_window_bwd_", &isolation_window_bwd_);
  m.impl("momentum_scan", &momentum_scan);
  m.impl("momentum_add_", &momentum_add_);
}

}  // namespace fastattn_icl
