// CUDA kernel of the fused multi-tensor EMA update: one launch over all tensors.
//
// Algorithm (multi-tensor apply with a device-side table):
//   * The host writes one 48-byte Entry per tensor (ema/param/teacher pointers,
//     numel, index of its first tile, flags) plus a sentinel, into a pinned
//     buffer that is copied to the device asynchronously (no host sync).
//   * Each tensor is cut into tiles of kTile = 256 threads x 8 elements x 2
//     (unroll) = 4096 elements; tiles are numbered globally in list order.
//   * A grid of (#SMs x resident blocks per SM) blocks walks the tiles
//     grid-stride; each block finds the tensor of its first tile by binary
//     search over Entry::tile_begin and then only moves forward through the
//     table (tiles are visited in increasing order).
//   * Within a tile, if all three pointers are 16-byte aligned, each thread loads
//     8 elements per vector with 16-byte loads (2 x float4 of ema, one uint4 of
//     bf16 params or 2 x float4 of fp32 params), both unrolled vectors' loads are
//     issued before any arithmetic, and the < 8 leftover elements of the tensor's
//     last tile go through the scalar path. Misaligned tensors (views at odd
//     offsets) use the scalar path throughout.
//   * Loads and stores use the streaming cache hints (.cs): every byte is touched
//     once per call.
// Dtypes: ema float32, params float32 | bfloat16 (per tensor), teacher bfloat16
// (per tensor, optional). Element math and rounding: ema_math.h.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "ema/ema_kernels.h"
#include "ema/ema_math.h"

namespace mirai {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;     // elements per vector (16 bytes of bf16, 2 x 16 bytes of fp32)
constexpr int kUnroll = 2;  // vectors per thread per tile
constexpr int64_t kTile = int64_t(kThreads) * kVec * kUnroll;

enum : int64_t { kParamBF16 = 1, kAligned = 2 };

// One table row per tensor; row n is a sentinel with tile_begin = total tiles.
struct Entry {
  int64_t ema;         // float*
  int64_t param;       // const float* or const bf16*
  int64_t teacher;     // bf16* or 0
  int64_t numel;
  int64_t tile_begin;  // global index of the tensor's first tile
  int64_t flags;       // kParamBF16 | kAligned
};
static_assert(sizeof(Entry) == 48, "Entry layout is shared with the host packing code");

struct Coeffs {
  float d;  // decay
  float a;  // 1 - decay
};

__device__ __forceinline__ void load8(const float* p, float (&v)[kVec]) {
  const float4 x = __ldcs(reinterpret_cast<const float4*>(p));
  const float4 y = __ldcs(reinterpret_cast<const float4*>(p) + 1);
  v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
  v[4] = y.x; v[5] = y.y; v[6] = y.z; v[7] = y.w;
}

__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[kVec]) {
  const uint4 w = __ldcs(reinterpret_cast<const uint4*>(p));
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    v[2 * k] = __uint_as_float(words[k] << 16);              // low half = element 2k
    v[2 * k + 1] = __uint_as_float(words[k] & 0xFFFF0000u);  // high half = element 2k+1
  }
}

__device__ __forceinline__ void store8(float* p, const float (&v)[kVec]) {
  __stcs(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
  __stcs(reinterpret_cast<float4*>(p) + 1, make_float4(v[4], v[5], v[6], v[7]));
}

__device__ __forceinline__ void store8_bf16(__nv_bfloat16* p, const float (&v)[kVec]) {
  uint32_t words[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    words[k] = uint32_t(ema_math::float_to_bf16_bits(v[2 * k])) |
               (uint32_t(ema_math::float_to_bf16_bits(v[2 * k + 1])) << 16);
  }
  __stcs(reinterpret_cast<uint4*>(p), make_uint4(words[0], words[1], words[2], words[3]));
}

template <typename P>
__device__ __forceinline__ float load1(const P* p, int64_t i);
template <>
__device__ __forceinline__ float load1<float>(const float* p, int64_t i) { return __ldcs(p + i); }
template <>
__device__ __forceinline__ float load1<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return ema_math::bf16_bits_to_float(__ldcs(reinterpret_cast<const unsigned short*>(p) + i));
}

template <typename P, bool kTeacher>
__device__ __forceinline__ void step1(float* ema, const P* param, __nv_bfloat16* teacher, int64_t i,
                                      Coeffs c) {
  const float r = ema_math::ema_step(__ldcs(ema + i), load1<P>(param, i), c.d, c.a);
  __stcs(ema + i, r);
  if (kTeacher) {
    __stcs(reinterpret_cast<unsigned short*>(teacher) + i, ema_math::float_to_bf16_bits(r));
  }
}

// Elements [begin, end) of one tensor, 16-byte vectors plus a scalar tail.
template <typename P, bool kTeacher>
__device__ __forceinline__ void tile_vector(float* ema, const P* param, __nv_bfloat16* teacher,
                                            int64_t begin, int64_t end, Coeffs c) {
  const int64_t vec_end = begin + ((end - begin) / kVec) * kVec;  // end of the full vectors
  float ev[kUnroll][kVec];
  float pv[kUnroll][kVec];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = begin + (int64_t(u) * kThreads + threadIdx.x) * kVec;
    if (i < vec_end) {
      load8(ema + i, ev[u]);
      load8(param + i, pv[u]);
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = begin + (int64_t(u) * kThreads + threadIdx.x) * kVec;
    if (i < vec_end) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) ev[u][k] = ema_math::ema_step(ev[u][k], pv[u][k], c.d, c.a);
      store8(ema + i, ev[u]);
      if (kTeacher) store8_bf16(teacher + i, ev[u]);
    }
  }
  const int64_t i = vec_end + threadIdx.x;  // fewer than kVec leftover elements
  if (i < end) step1<P, kTeacher>(ema, param, teacher, i, c);
}

// Elements [begin, end) of one misaligned tensor, one element per thread and step.
template <typename P, bool kTeacher>
__device__ __forceinline__ void tile_scalar(float* ema, const P* param, __nv_bfloat16* teacher,
                                            int64_t begin, int64_t end, Coeffs c) {
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) step1<P, kTeacher>(ema, param, teacher, i, c);
}

template <typename P, bool kTeacher>
__device__ __forceinline__ void run_tile(const Entry& e, int64_t begin, int64_t end, Coeffs c) {
  float* ema = reinterpret_cast<float*>(e.ema);
  const P* param = reinterpret_cast<const P*>(e.param);
  __nv_bfloat16* teacher = reinterpret_cast<__nv_bfloat16*>(e.teacher);
  if (e.flags & kAligned) {
    tile_vector<P, kTeacher>(ema, param, teacher, begin, end, c);
  } else {
    tile_scalar<P, kTeacher>(ema, param, teacher, begin, end, c);
  }
}

__global__ void __launch_bounds__(kThreads)
ema_multi_tensor_kernel(const Entry* __restrict__ table, int n_tensors, int64_t n_tiles, Coeffs c,
                        const void* decay_ptr, bool decay_is_double) {
  if (decay_ptr != nullptr) {
    const double v = decay_is_double ? *static_cast<const double*>(decay_ptr)
                                     : ema_math::float_to_double(*static_cast<const float*>(decay_ptr));
    c.d = ema_math::double_to_float_rn(v);
    c.a = ema_math::double_to_float_rn(1.0 - v);
  }
  int64_t t = blockIdx.x;
  if (t >= n_tiles) return;
  // Largest tensor index i with tile_begin[i] <= t (skips empty tensors).
  int lo = 0, hi = n_tensors;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (table[mid].tile_begin <= t) lo = mid; else hi = mid;
  }
  int i = lo;
  for (; t < n_tiles; t += gridDim.x) {
    while (table[i + 1].tile_begin <= t) ++i;
    const Entry e = table[i];
    const int64_t begin = (t - e.tile_begin) * kTile;
    const int64_t end = begin + kTile < e.numel ? begin + kTile : e.numel;
    const bool bf16 = e.flags & kParamBF16;
    if (e.teacher != 0) {
      if (bf16) run_tile<__nv_bfloat16, true>(e, begin, end, c);
      else run_tile<float, true>(e, begin, end, c);
    } else {
      if (bf16) run_tile<__nv_bfloat16, false>(e, begin, end, c);
      else run_tile<float, false>(e, begin, end, c);
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

void ema_update_cuda(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params,
                     const TeacherList& teacher, const EmaDecay& decay) {
  const c10::cuda::CUDAGuard guard(ema[0].device());
  const int n = static_cast<int>(ema.size());
  TORCH_CHECK(ema.size() < (1u << 30), "ema_update_: too many tensors (", ema.size(), ")");

  // Table: n rows + sentinel, packed as int64 into pinned host memory.
  at::Tensor host = at::empty({int64_t(n + 1) * int64_t(sizeof(Entry) / sizeof(int64_t))},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  Entry* rows = reinterpret_cast<Entry*>(host.data_ptr<int64_t>());
  int64_t tiles = 0;
  for (int i = 0; i < n; ++i) {
    Entry& r = rows[i];
    void* e = ema[i].data_ptr();
    const void* p = params[i].data_ptr();
    void* t = (!teacher.empty() && teacher[i].has_value()) ? teacher[i]->data_ptr() : nullptr;
    r.ema = reinterpret_cast<int64_t>(e);
    r.param = reinterpret_cast<int64_t>(p);
    r.teacher = reinterpret_cast<int64_t>(t);
    r.numel = ema[i].numel();
    r.tile_begin = tiles;
    const bool aligned = aligned16(e) && aligned16(p) && (t == nullptr || aligned16(t));
    r.flags = (params[i].scalar_type() == at::kBFloat16 ? kParamBF16 : 0) | (aligned ? kAligned : 0);
    tiles += (r.numel + kTile - 1) / kTile;
  }
  std::memset(&rows[n], 0, sizeof(Entry));
  rows[n].tile_begin = tiles;
  if (tiles == 0) return;

  const at::Tensor table =
      host.to(at::TensorOptions().device(ema[0].device()).dtype(at::kLong), /*non_blocking=*/true);

  static thread_local int cached_device = -1;
  static thread_local int cached_grid = 0;
  const int dev = ema[0].device().index();
  if (cached_device != dev) {
    int blocks_per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, ema_multi_tensor_kernel,
                                                                 kThreads, 0));
    const int sms = at::cuda::getDeviceProperties(dev)->multiProcessorCount;
    cached_grid = std::max(1, blocks_per_sm) * sms;
    cached_device = dev;
  }
  const int grid = static_cast<int>(std::min<int64_t>(tiles, cached_grid));
  ema_multi_tensor_kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const Entry*>(table.data_ptr<int64_t>()), n, tiles, Coeffs{decay.decay, decay.one_minus},
      decay.ptr, decay.ptr_is_double);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mirai
