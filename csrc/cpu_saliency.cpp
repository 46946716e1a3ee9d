// The saliency reduction of the CPU attention path (fastattn_icl/ops/_torch_backend.py: attention_saliency; the math
// is docs/methods.md §4) for one chunk of query rows, after the two matmuls the backend leaves to PyTorch:
//   p  [B, H, n, Tc]  exp(s · scale − lse) of query rows row0 .. row0 + n − 1 over keys 0 .. Tc − 1, the exp argument
//                     clamped at the floor (a value at or below p_min = exp(floor) counts as 0: the eager path's
//                     floored exp gives 0 below the floor, so the two differ only at arguments within rounding of it,
//                     terms under 1e-31 · dP); entries at keys a row does not see are never read (they may be inf)
//   dp [B, H, n, Tc]  dO · vᵀ of the same rows and keys
// Both contiguous, float32 or float64. Query row i is key position i (the op is square, Tq == Tk). Over the keys j row
// i sees (j <= i when causal; kept by the bool key mask [B, Tk]):
//   I[i, j] = |Σ_h p · dp|,   lower(i) = Σ_{j < i} I[i, j] when i <= target[b] (else 0),   label(i) = Σ_{j label} I[i, j]
// Returns float64 [B, 1 + H·per_head, 3]: per batch row [Σ_{i label} lower(i), label(target), Σ_i lower(i)], then the
// same with |p · dp| of each head alone (per_head). Writes I[i, 0 .. Tc) and zeros after it into rows[b, slot] (float32
// [B, R, T], unit stride along T) for every row with slot = row_slot[b, i] >= 0. label is uint8 [B, T] (nonzero: a label
// position), target and row_slot int32.
//
// One pass over p and dp instead of about fifteen PyTorch passes over the chunk's [B, H, n, Tc] scores: the multiply,
// the sum over heads, the absolute value, the masks and the three sums. at::parallel_for over (b, row); a row's sums run
// in float64. Like csrc/cpu_features.cpp, each row body is compiled twice, for the baseline ISA and with AVX2 + FMA
// enabled (the compiler vectorises the loops), chosen at run time.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_isa.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace fastattn_icl {

namespace {

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FASTATTN_ICL_SAL_AVX2 __attribute__((target("avx2,fma")))
#else
#define FASTATTN_ICL_SAL_AVX2
#endif

template <typename T>
struct Chunk {
  const T* p;
  const T* dp;
  int64_t B, H, n, Tc, T_len, row0;
  bool causal, per_head;
  const bool* kpm;  // [B, Tk] or nullptr
  int64_t kpm_stride;
  const uint8_t* label;  // [B, T]
  int64_t label_stride;
  const int32_t* target;  // [B]
  const int32_t* slot;    // [B, T] or nullptr
  int64_t slot_stride;
  float* rows;  // [B, R, T] or nullptr
  int64_t rows_s0, rows_s1;
  T p_min;
  double* part;  // [B, n, 1 + H·per_head, 3]
};

// Row r of batch row b; acc and seen: scratch of Tc entries.
template <typename T>
inline __attribute__((always_inline)) void saliency_row(const Chunk<T>& c, int64_t b, int64_t r, T* acc,
                                                        uint8_t* seen) {
  const int64_t i = c.row0 + r;
  const int64_t stop = c.causal ? std::min(c.Tc, i + 1) : c.Tc;
  const int64_t lower_end = std::min(stop, i);  // keys j < i
  const uint8_t* lab = c.label + b * c.label_stride;
  for (int64_t j = 0; j < stop; ++j) {
    seen[j] = c.kpm == nullptr || c.kpm[b * c.kpm_stride + j] ? 1 : 0;
    acc[j] = T(0);
  }
  const int64_t width = 1 + (c.per_head ? c.H : 0);
  double* out = c.part + (b * c.n + r) * width * 3;
  const bool lower_row = i <= c.target[b], label_row = lab[i] != 0, target_row = i == c.target[b];
  for (int64_t h = 0; h < c.H; ++h) {
    const T* ph = c.p + ((b * c.H + h) * c.n + r) * c.Tc;
    const T* dh = c.dp + ((b * c.H + h) * c.n + r) * c.Tc;
    if (!c.per_head) {
      for (int64_t j = 0; j < stop; ++j) {
        acc[j] += seen[j] && ph[j] > c.p_min ? ph[j] * dh[j] : T(0);
      }
      continue;
    }
    double lower = 0.0, labelled = 0.0;
    for (int64_t j = 0; j < stop; ++j) {
      const T x = seen[j] && ph[j] > c.p_min ? ph[j] * dh[j] : T(0);
      acc[j] += x;
      const double a = std::abs(static_cast<double>(x));
      lower += j < lower_end ? a : 0.0;
      labelled += lab[j] ? a : 0.0;
    }
    double* o = out + (1 + h) * 3;
    o[0] = lower_row && label_row ? lower : 0.0;
    o[1] = target_row ? labelled : 0.0;
    o[2] = lower_row ? lower : 0.0;
  }
  double lower = 0.0, labelled = 0.0;
  for (int64_t j = 0; j < stop; ++j) {
    const double a = std::abs(static_cast<double>(acc[j]));
    lower += j < lower_end ? a : 0.0;
    labelled += lab[j] ? a : 0.0;
  }
  out[0] = lower_row && label_row ? lower : 0.0;
  out[1] = target_row ? labelled : 0.0;
  out[2] = lower_row ? lower : 0.0;
  if (c.slot != nullptr && c.slot[b * c.slot_stride + i] >= 0) {
    float* dst = c.rows + b * c.rows_s0 + c.slot[b * c.slot_stride + i] * c.rows_s1;
    for (int64_t j = 0; j < stop; ++j) {
      dst[j] = static_cast<float>(std::abs(acc[j]));
    }
    std::fill(dst + stop, dst + c.T_len, 0.0f);
  }
}

template <typename T>
FASTATTN_ICL_SAL_AVX2 void rows_avx2(const Chunk<T>& c, int64_t begin, int64_t end, T* acc, uint8_t* seen) {
  for (int64_t task = begin; task < end; ++task) {
    saliency_row(c, task / c.n, task % c.n, acc, seen);
  }
}

template <typename T>
void rows_plain(const Chunk<T>& c, int64_t begin, int64_t end, T* acc, uint8_t* seen) {
  for (int64_t task = begin; task < end; ++task) {
    saliency_row(c, task / c.n, task % c.n, acc, seen);
  }
}

void check_int_table(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef sizes) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.sizes() == sizes && t.stride(-1) == 1, name,
              " must be a CPU ", dtype, " tensor ", sizes, " with a unit last stride, got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
}

at::Tensor saliency_reduce(const at::Tensor& p, const at::Tensor& dp, const std::optional<at::Tensor>& kpm,
                           const at::Tensor& label, const at::Tensor& target, int64_t row0, bool causal, bool per_head,
                           const std::optional<at::Tensor>& row_slot, const std::optional<at::Tensor>& rows,
                           double p_min) {
  TORCH_CHECK(p.device().is_cpu() && (p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble) &&
                  p.dim() == 4 && p.is_contiguous(),
              "p must be a contiguous CPU float32 or float64 tensor [B, H, n, Tc], got ", p.scalar_type(), " ",
              p.sizes(), " on ", p.device());
  TORCH_CHECK(dp.scalar_type() == p.scalar_type() && dp.sizes() == p.sizes() && dp.is_contiguous() &&
                  dp.device().is_cpu(),
              "dp must be a contiguous CPU tensor like p ", p.sizes(), ", got ", dp.scalar_type(), " ", dp.sizes());
  const int64_t B = p.size(0), H = p.size(1), n = p.size(2), Tc = p.size(3);
  TORCH_CHECK(label.dim() == 2, "label must be [B, T], got ", label.sizes());
  const int64_t T_len = label.size(1);
  check_int_table(label, "label", at::kByte, {B, T_len});
  check_int_table(target, "target", at::kInt, {B});
  TORCH_CHECK(row0 >= 0 && row0 + n <= T_len && Tc <= T_len, "rows ", row0, " .. ", row0 + n, " and ", Tc,
              " keys must lie in the ", T_len, " positions");
  if (kpm.has_value()) {
    check_int_table(*kpm, "key_padding_mask", at::kBool, {B, kpm->size(1)});
    TORCH_CHECK(kpm->size(1) >= Tc, "key_padding_mask has ", kpm->size(1), " keys, fewer than the ", Tc, " read");
  }
  TORCH_CHECK(row_slot.has_value() == rows.has_value(), "row_slot and rows go together");
  if (rows.has_value()) {
    check_int_table(*row_slot, "row_slot", at::kInt, {B, T_len});
    check_int_table(*rows, "rows", at::kFloat, {B, rows->size(1), T_len});
  }
  const int32_t* tgt = target.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(tgt[b] >= 0 && tgt[b] < T_len, "target must be a position in [0, ", T_len, "), got ", tgt[b]);
  }
  if (rows.has_value()) {
    const int32_t* s = row_slot->data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = row0; i < row0 + n; ++i) {
        const int32_t slot = s[b * row_slot->stride(0) + i];
        TORCH_CHECK(slot < rows->size(1), "row_slot ", slot, " is past the ", rows->size(1), " rows");
      }
    }
  }
  const int64_t width = 1 + (per_head ? H : 0);
  at::Tensor part = at::zeros({B, n, width, 3}, p.options().dtype(at::kDouble));
  static const bool avx2 = avx2_usable(/*fma=*/true, /*f16c=*/false);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "saliency_reduce", [&] {
    const Chunk<scalar_t> c{p.data_ptr<scalar_t>(),
                            dp.data_ptr<scalar_t>(),
                            B, H, n, Tc, T_len, row0, causal, per_head,
                            kpm.has_value() ? kpm->data_ptr<bool>() : nullptr,
                            kpm.has_value() ? kpm->stride(0) : 0,
                            label.data_ptr<uint8_t>(),
                            label.stride(0),
                            tgt,
                            rows.has_value() ? row_slot->data_ptr<int32_t>() : nullptr,
                            rows.has_value() ? row_slot->stride(0) : 0,
                            rows.has_value() ? rows->data_ptr<float>() : nullptr,
                            rows.has_value() ? rows->stride(0) : 0,
                            rows.has_value() ? rows->stride(1) : 0,
                            static_cast<scalar_t>(p_min),
                            part.data_ptr<double>()};
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, H * Tc));
    at::parallel_for(0, B * n, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> acc(Tc);
      std::vector<uint8_t> seen(Tc);
      avx2 ? rows_avx2(c, begin, end, acc.data(), seen.data()) : rows_plain(c, begin, end, acc.data(), seen.data());
    });
  });
  return part.sum(1);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn_icl, CPU, m) {
  m.impl("saliency_reduce", &saliency_reduce);
}

}  // namespace fastattn_icl
