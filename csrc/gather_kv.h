// fastattn_icl::gather_kv: host-side validation and layout plan shared by the CPU and CUDA kernels.
//
// gather_kv(Tensor[] keys, Tensor[] values, Tensor index) -> (Tensor K, Tensor V)
//   keys[l], values[l]: [B, Hkv, T, D], the same shape, dtype and device for every layer l < L;
//                       any strides (non-contiguous views of a cache are read in place).
//   index:              int64 [B, M], any strides (a [M] index expanded to [B, M] costs nothing).
//   K, V:               [L, B, Hkv, M, D], contiguous, K[l, b, h, m] = keys[l][b, h, index[b, m]].
//
// The copy is a bit-exact gather, so the kernels move raw bytes (dispatching on the element size,
// not the dtype): every dtype is supported and nothing is ever converted or rounded.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace fastattn_icl {

// One source tensor (keys[l] or values[l]) as seen by the kernels. All strides are in BYTES, and the
// stride of a dimension of size 1 is normalised to 0 (it is never used), so that odd strides of
// broadcast dimensions do not defeat the alignment analysis. `step` is the byte distance between two
// consecutive copy units along D: the element stride for a strided copy, or the vector width when
// the kernel copies D-contiguous rows in wide chunks (set by the CUDA launcher).
struct SrcDesc {
  int64_t ptr;  // data pointer (address of element [0, 0, 0, 0]), as an integer
  int64_t sb;
  int64_t sh;
  int64_t st;
  int64_t step;
};
static_assert(sizeof(SrcDesc) == 5 * sizeof(int64_t), "SrcDesc is copied to the device as int64[5]");

struct GatherKvPlan {
  int64_t L = 0, B = 0, H = 0, T = 0, M = 0, D = 0;
  int64_t esize = 0;            // bytes per element
  std::vector<SrcDesc> descs;   // 2 * L entries: keys[0..L), then values[0..L)
  std::vector<int64_t> sd;      // element stride along D of each entry, in bytes (== esize: contiguous)
  const int64_t* index = nullptr;
  int64_t isb = 0, ism = 0;     // index strides, in elements
  at::Tensor out_k, out_v;      // [L, B, H, M, D], contiguous, allocated on the inputs' device

  // Number of D-rows copied in all (keys and values).
  int64_t rows() const { return 2 * L * B * H * M; }
  bool empty() const { return rows() == 0 || D == 0; }
};

// Checks shapes, dtypes, devices (all on `device_type`) and allocates the outputs. Does not read the
// index values (the CPU kernel range-checks them on the host; the CUDA kernel on the device).
GatherKvPlan plan_gather_kv(at::TensorList keys, at::TensorList values, const at::Tensor& index,
                            c10::DeviceType device_type);

// Throws an IndexError naming the first position of `index` outside [0, T). Host memory only.
void check_index_range_cpu(const GatherKvPlan& plan);

}  // namespace fastattn_icl
