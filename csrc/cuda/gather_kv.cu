// fastattn_icl::gather_kv, CUDA kernel: every layer's keys and values in ONE launch.
//
// The launcher packs, for each of the 2L source tensors (keys[0..L), values[0..L)), its data pointer
// and byte strides into an int64 table (SrcDesc, gather_kv.h), copies it to the device through pinned
// memory on the current stream, and launches one grid over the 2 * L * B * Hkv * M output rows.
// threadIdx.y picks a row, threadIdx.x walks the row's D elements in copy units:
//   - when every source is contiguous along D and every base pointer / row stride / row length is a
//     multiple of 16 (8, 4, 2) bytes, a unit is a 16 (8, 4, 2) byte vector: bf16 / fp16 rows with D a
//     multiple of 8 move as uint4 loads and stores;
//   - otherwise (D not innermost, for example a transposed view) a unit is one element, read at its
//     own stride.
// The copy moves bytes (dispatch on the unit size, not the dtype), so every dtype works bit-exactly.
//
// Index validation: positions are checked on the device with CUDA_KERNEL_ASSERT (an out-of-range
// position is a device-side assert, like torch.index_select), because a host-side check would force
// a device-to-host sync on every call. The public wrapper fastattn_icl.ops.gather.gather_kv checks
// the range on the host first and raises a ValueError (check_index=False skips that sync).
#ifdef FASTATTN_ICL_WITH_CUDA

#include "../gather_kv.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace fastattn_icl {
namespace {

// Row decomposition in IdxT (32-bit when the row count allows: 64-bit division is slow on GPUs);
// byte offsets are always 64-bit.
template <typename UnitT, typename IdxT>
__global__ void gather_kv_kernel(const SrcDesc* __restrict__ descs, const int64_t* __restrict__ index,
                                 int64_t isb, int64_t ism, char* __restrict__ out_k,
                                 char* __restrict__ out_v, IdxT L, IdxT B, IdxT H, IdxT M, int64_t T,
                                 IdxT units_per_row) {
  const IdxT half = L * B * H * M;  // rows of K; rows [half, 2 * half) are V
  const IdxT rows = 2 * half;
  const IdxT row_stride = static_cast<IdxT>(gridDim.x) * static_cast<IdxT>(blockDim.y);
  for (IdxT row = static_cast<IdxT>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows; row += row_stride) {
    const bool is_v = row >= half;
    const IdxT r0 = is_v ? row - half : row;
    IdxT r = r0;
    const IdxT m = r % M;
    r /= M;
    const IdxT h = r % H;
    r /= H;
    const IdxT b = r % B;
    const IdxT l = r / B;
    const int64_t t = index[static_cast<int64_t>(b) * isb + static_cast<int64_t>(m) * ism];
    CUDA_KERNEL_ASSERT(t >= 0 && t < T && "gather_kv: index out of range [0, T)");
    const SrcDesc d = descs[(is_v ? L : IdxT{0}) + l];
    const char* src = reinterpret_cast<const char*>(d.ptr) + static_cast<int64_t>(b) * d.sb +
                      static_cast<int64_t>(h) * d.sh + t * d.st;
    UnitT* dst = reinterpret_cast<UnitT*>(is_v ? out_v : out_k) +
                 static_cast<int64_t>(r0) * static_cast<int64_t>(units_per_row);
    for (IdxT j = threadIdx.x; j < units_per_row; j += blockDim.x) {
      // __ldg: the sources are read-only here, and the compiler cannot tell that a pointer taken from
      // the descriptor table is global memory (it would emit generic loads).
      dst[j] = __ldg(reinterpret_cast<const UnitT*>(src + static_cast<int64_t>(j) * d.step));
    }
  }
}

// Largest power-of-two unit (<= 16 bytes) dividing every base pointer, row stride and the row
// length, when every source is contiguous along D; 0 when some source is strided along D.
int64_t vector_bytes(const GatherKvPlan& p) {
  const int64_t row_bytes = p.D * p.esize;
  int64_t bits = row_bytes | reinterpret_cast<int64_t>(p.out_k.data_ptr()) |
                 reinterpret_cast<int64_t>(p.out_v.data_ptr());
  for (size_t e = 0; e < p.descs.size(); ++e) {
    const SrcDesc& d = p.descs[e];
    if (p.sd[e] != p.esize) {
      return 0;
    }
    bits |= d.ptr | d.sb | d.sh | d.st;
  }
  int64_t vec = 16;
  while (vec > 1 && (bits & (vec - 1)) != 0) {
    vec /= 2;
  }
  return vec;
}

template <typename UnitT>
void launch(const GatherKvPlan& p, const SrcDesc* descs, int64_t units_per_row, cudaStream_t stream) {
  // Threads along a row: the next power of two >= units_per_row, at most 256; the rest of a
  // 256-thread block takes further rows.
  int threads_x = 1;
  while (threads_x < units_per_row && threads_x < 256) {
    threads_x *= 2;
  }
  const int threads_y = 256 / threads_x;
  const int64_t rows = p.rows();
  int device = 0;
  int sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((rows + threads_y - 1) / threads_y, int64_t{sms} * 32));
  const dim3 block(threads_x, threads_y);
  char* out_k = static_cast<char*>(p.out_k.data_ptr());
  char* out_v = static_cast<char*>(p.out_v.data_ptr());
  // 32-bit row arithmetic when every row id (plus one grid stride) and unit id fits.
  const int64_t limit = std::numeric_limits<int32_t>::max();
  if (rows + blocks * threads_y < limit && units_per_row + threads_x < limit) {
    gather_kv_kernel<UnitT, uint32_t><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
        descs, p.index, p.isb, p.ism, out_k, out_v, static_cast<uint32_t>(p.L), static_cast<uint32_t>(p.B),
        static_cast<uint32_t>(p.H), static_cast<uint32_t>(p.M), p.T, static_cast<uint32_t>(units_per_row));
  } else {
    gather_kv_kernel<UnitT, uint64_t><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
        descs, p.index, p.isb, p.ism, out_k, out_v, static_cast<uint64_t>(p.L), static_cast<uint64_t>(p.B),
        static_cast<uint64_t>(p.H), static_cast<uint64_t>(p.M), p.T, static_cast<uint64_t>(units_per_row));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> gather_kv_cuda(at::TensorList keys, at::TensorList values,
                                                  const at::Tensor& index) {
  GatherKvPlan p = plan_gather_kv(keys, values, index, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(p.out_k.device());
  if (p.empty()) {
    return {p.out_k, p.out_v};
  }

  int64_t unit = vector_bytes(p);
  int64_t units_per_row = 0;
  if (unit > 0) {
    units_per_row = p.D * p.esize / unit;
    for (auto& d : p.descs) {
      d.step = unit;
    }
  } else {
    unit = p.esize;  // element-wise: step stays each source's own D stride in bytes
    units_per_row = p.D;
  }

  // Descriptor table -> device, through pinned memory and on the current stream (the caching host
  // allocator keeps the pinned block alive until the copy has run; the device block is freed in
  // stream order after the kernel).
  const int64_t n = static_cast<int64_t>(p.descs.size());
  at::Tensor host = at::empty({n, 5}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.data_ptr<int64_t>(), p.descs.data(), static_cast<size_t>(n) * sizeof(SrcDesc));
  at::Tensor dev = host.to(keys[0].device(), /*non_blocking=*/true);
  const SrcDesc* descs = reinterpret_cast<const SrcDesc*>(dev.data_ptr<int64_t>());

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (unit) {
    case 16: launch<uint4>(p, descs, units_per_row, stream); break;
    case 8: launch<uint2>(p, descs, units_per_row, stream); break;
    case 4: launch<uint32_t>(p, descs, units_per_row, stream); break;
    case 2: launch<uint16_t>(p, descs, units_per_row, stream); break;
    case 1: launch<uint8_t>(p, descs, units_per_row, stream); break;
    default: TORCH_CHECK(false, "gather_kv: internal error, unit of ", unit, " bytes");
  }
  return {p.out_k, p.out_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn_icl, CUDA, m) {
  m.impl("gather_kv", &gather_kv_cuda);
}

}  // namespace fastattn_icl

#endif  // FASTATTN_ICL_WITH_CUDA
