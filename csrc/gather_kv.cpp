// fastattn_icl::gather_kv: shared validation (plan_gather_kv) and the CPU kernel.
// See gather_kv.h for the contract; the CUDA kernel is in cuda/gather_kv.cu.
#include "gather_kv.h"

#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cstring>

namespace fastattn_icl {

namespace {

bool is_supported_element_size(int64_t esize) {
  return esize == 1 || esize == 2 || esize == 4 || esize == 8 || esize == 16;
}

void check_source(const at::Tensor& t, const char* name, int64_t l, const at::Tensor& ref,
                  c10::DeviceType device_type) {
  TORCH_CHECK(t.defined(), "gather_kv: ", name, "[", l, "] is an undefined tensor");
  TORCH_CHECK(t.layout() == at::kStrided, "gather_kv: ", name, "[", l,
              "] must be a strided (dense) tensor, got layout ", t.layout());
  TORCH_CHECK(t.dim() == 4, "gather_kv: ", name, "[", l, "] must be [B, Hkv, T, D] (4-D), got shape ",
              t.sizes());
  TORCH_CHECK(t.sizes() == ref.sizes(), "gather_kv: ", name, "[", l, "] has shape ", t.sizes(),
              " but keys[0] has shape ", ref.sizes(),
              "; every layer's keys and values must be [B, Hkv, T, D] with the same shape");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "gather_kv: ", name, "[", l, "] has dtype ",
              t.scalar_type(), " but keys[0] has dtype ", ref.scalar_type(),
              "; every layer's keys and values must share one dtype");
  TORCH_CHECK(t.device() == ref.device(), "gather_kv: ", name, "[", l, "] is on ", t.device(),
              " but keys[0] is on ", ref.device(), "; all tensors must be on one device");
  TORCH_CHECK(t.device().type() == device_type, "gather_kv: the ", c10::DeviceTypeName(device_type),
              " kernel got ", name, "[", l, "] on ", t.device());
}

SrcDesc describe(const at::Tensor& t, int64_t esize) {
  auto stride = [&](int64_t dim) { return t.size(dim) == 1 ? int64_t{0} : t.stride(dim) * esize; };
  SrcDesc d;
  d.ptr = reinterpret_cast<int64_t>(t.data_ptr());
  d.sb = stride(0);
  d.sh = stride(1);
  d.st = stride(2);
  // A D of 1 has no stride to speak of: call it contiguous.
  d.step = t.size(3) == 1 ? esize : t.stride(3) * esize;
  return d;
}

}  // namespace

GatherKvPlan plan_gather_kv(at::TensorList keys, at::TensorList values, const at::Tensor& index,
                            c10::DeviceType device_type) {
  TORCH_CHECK(!keys.empty(), "gather_kv: keys is an empty list; pass one [B, Hkv, T, D] tensor per layer");
  TORCH_CHECK(keys.size() == values.size(), "gather_kv: got ", keys.size(), " key tensors but ",
              values.size(), " value tensors; pass one of each per layer");
  const at::Tensor& ref = keys[0];
  for (const auto l : c10::irange(keys.size())) {
    check_source(keys[l], "keys", static_cast<int64_t>(l), ref, device_type);
    check_source(values[l], "values", static_cast<int64_t>(l), ref, device_type);
  }
  const int64_t esize = static_cast<int64_t>(ref.element_size());
  TORCH_CHECK(is_supported_element_size(esize), "gather_kv: unsupported dtype ", ref.scalar_type(),
              " (element size ", esize, " bytes)");

  GatherKvPlan p;
  p.L = static_cast<int64_t>(keys.size());
  p.B = ref.size(0);
  p.H = ref.size(1);
  p.T = ref.size(2);
  p.D = ref.size(3);
  p.esize = esize;

  TORCH_CHECK(index.defined(), "gather_kv: index is an undefined tensor");
  TORCH_CHECK(index.scalar_type() == at::kLong, "gather_kv: index must be int64, got ", index.scalar_type());
  TORCH_CHECK(index.dim() == 2 && index.size(0) == p.B, "gather_kv: index must be [B, M] = [", p.B,
              ", M] (one row of positions per batch row), got shape ", index.sizes());
  TORCH_CHECK(index.layout() == at::kStrided, "gather_kv: index must be a strided (dense) tensor");
  TORCH_CHECK(index.device() == ref.device(), "gather_kv: index is on ", index.device(), " but keys are on ",
              ref.device(), "; all tensors must be on one device");
  p.M = index.size(1);
  p.index = index.data_ptr<int64_t>();
  p.isb = index.size(0) == 1 ? 0 : index.stride(0);
  p.ism = index.size(1) == 1 ? 0 : index.stride(1);

  p.descs.reserve(2 * p.L);
  p.sd.reserve(2 * p.L);
  for (const auto& list : {keys, values}) {
    for (const auto& t : list) {
      p.descs.push_back(describe(t, esize));
      p.sd.push_back(p.descs.back().step);
    }
  }
  const auto opts = ref.options().memory_format(at::MemoryFormat::Contiguous);
  p.out_k = at::empty({p.L, p.B, p.H, p.M, p.D}, opts);
  p.out_v = at::empty({p.L, p.B, p.H, p.M, p.D}, opts);
  return p;
}

void check_index_range_cpu(const GatherKvPlan& p) {
  for (const auto b : c10::irange(p.B)) {
    for (const auto m : c10::irange(p.M)) {
      const int64_t t = p.index[b * p.isb + m * p.ism];
      TORCH_CHECK_INDEX(t >= 0 && t < p.T, "gather_kv: index[", b, ", ", m, "] = ", t,
                        " is out of range: positions must be in [0, T) = [0, ", p.T, ")");
    }
  }
}

namespace {

template <typename U>
void copy_strided(char* dst, const char* src, int64_t n, int64_t step) {
  U* out = reinterpret_cast<U*>(dst);
  for (int64_t j = 0; j < n; ++j) {
    std::memcpy(out + j, src + j * step, sizeof(U));
  }
}

struct alignas(16) Bytes16 {
  unsigned char b[16];
};

std::tuple<at::Tensor, at::Tensor> gather_kv_cpu(at::TensorList keys, at::TensorList values,
                                                 const at::Tensor& index) {
  const GatherKvPlan p = plan_gather_kv(keys, values, index, c10::DeviceType::CPU);
  check_index_range_cpu(p);
  if (p.empty()) {
    return {p.out_k, p.out_v};
  }
  const int64_t row_bytes = p.D * p.esize;
  const int64_t half = p.L * p.B * p.H * p.M;  // rows of K; the next `half` rows are V
  char* out_k = static_cast<char*>(p.out_k.data_ptr());
  char* out_v = static_cast<char*>(p.out_v.data_ptr());
  // About 32 KiB per task: enough to amortise the thread hand-off, small enough to balance.
  const int64_t grain = std::max<int64_t>(1, (int64_t{32} << 10) / std::max<int64_t>(row_bytes, 1));

  at::parallel_for(0, p.rows(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const bool is_v = row >= half;
      const int64_t r0 = is_v ? row - half : row;
      int64_t r = r0;
      const int64_t m = r % p.M;
      r /= p.M;
      const int64_t h = r % p.H;
      r /= p.H;
      const int64_t b = r % p.B;
      const int64_t l = r / p.B;
      const int64_t t = p.index[b * p.isb + m * p.ism];
      const int64_t e = (is_v ? p.L : 0) + l;
      const SrcDesc& d = p.descs[e];
      const char* src = reinterpret_cast<const char*>(d.ptr) + b * d.sb + h * d.sh + t * d.st;
      char* dst = (is_v ? out_v : out_k) + r0 * row_bytes;
      if (d.step == p.esize) {
        std::memcpy(dst, src, static_cast<size_t>(row_bytes));
        continue;
      }
      switch (p.esize) {
        case 1: copy_strided<uint8_t>(dst, src, p.D, d.step); break;
        case 2: copy_strided<uint16_t>(dst, src, p.D, d.step); break;
        case 4: copy_strided<uint32_t>(dst, src, p.D, d.step); break;
        case 8: copy_strided<uint64_t>(dst, src, p.D, d.step); break;
        default: copy_strided<Bytes16>(dst, src, p.D, d.step); break;
      }
    }
  });
  return {p.out_k, p.out_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn_icl, CPU, m) {
  m.impl("gather_kv", &gather_kv_cpu);
}

}  // namespace fastattn_icl
