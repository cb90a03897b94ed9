// CUDA kernel of the fused multi-tensor EMA update: one launch over all tensors.
//
// Algorithm (multi-tensor apply with a device-side table, common/multi_tensor.cuh):
//   * The host writes one 48-byte row per tensor (ema/param/teacher pointers,
//     numel, index of its first tile, flags) plus a sentinel, into a pinned
//     buffer that is copied to the device asynchronously (no host sync).
//   * Each tensor is cut into tiles of kTile = 256 threads x 8 elements x 2
//     (unroll) = 4096 elements; tiles are numbered globally in list order.
//   * A grid of (#SMs x resident blocks per SM) blocks walks the tiles
//     grid-stride; each block finds the tensor of its first tile by binary
//     search over Row::tile_begin and then only moves forward through the
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

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/multi_tensor.cuh"
#include "ema/ema_kernels.h"
#include "ema/ema_math.h"

namespace mirai {
namespace {

namespace mt = multi_tensor;

constexpr int kThreads = 256;
constexpr int kVec = mt::kVec;  // elements per vector (16 bytes of bf16, 2 x 16 bytes of fp32)
constexpr int kUnroll = 2;      // vectors per thread per tile
constexpr int64_t kTile = int64_t(kThreads) * kVec * kUnroll;

enum Slot { kEma, kParam, kTeacher, kSlots };
enum : int64_t { kParamBF16 = 1, kAligned = 2 };
using Row = mt::Row<kSlots>;
static_assert(sizeof(Row) == 48, "one 48-byte table row per tensor");

struct Coeffs {
  float d;  // decay
  float a;  // 1 - decay
};

template <typename P, bool kTeacher>
__device__ __forceinline__ void step1(float* ema, const P* param, __nv_bfloat16* teacher, int64_t i,
                                      Coeffs c) {
  const float r = ema_math::ema_step(__ldcs(ema + i), mt::load1(param, i), c.d, c.a);
  __stcs(ema + i, r);
  if (kTeacher) mt::store1_bf16(teacher, i, r);
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
      mt::load8(ema + i, ev[u]);
      mt::load8(param + i, pv[u]);
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = begin + (int64_t(u) * kThreads + threadIdx.x) * kVec;
    if (i < vec_end) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) ev[u][k] = ema_math::ema_step(ev[u][k], pv[u][k], c.d, c.a);
      mt::store8(ema + i, ev[u]);
      if (kTeacher) mt::store8_bf16(teacher + i, ev[u]);
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
__device__ __forceinline__ void run_tile(const Row& e, int64_t begin, int64_t end, Coeffs c) {
  float* ema = reinterpret_cast<float*>(e.ptr[kEma]);
  const P* param = reinterpret_cast<const P*>(e.ptr[kParam]);
  __nv_bfloat16* teacher = reinterpret_cast<__nv_bfloat16*>(e.ptr[kTeacher]);
  if (e.flags & kAligned) {
    tile_vector<P, kTeacher>(ema, param, teacher, begin, end, c);
  } else {
    tile_scalar<P, kTeacher>(ema, param, teacher, begin, end, c);
  }
}

__global__ void __launch_bounds__(kThreads)
ema_multi_tensor_kernel(const Row* __restrict__ table, int n_tensors, int64_t n_tiles, Coeffs c,
                        const void* decay_ptr, bool decay_is_double) {
  if (decay_ptr != nullptr) {
    const double v = decay_is_double ? *static_cast<const double*>(decay_ptr)
                                     : ema_math::float_to_double(*static_cast<const float*>(decay_ptr));
    c.d = ema_math::double_to_float_rn(v);
    c.a = ema_math::double_to_float_rn(1.0 - v);
  }
  mt::for_each_tile(table, n_tensors, n_tiles, kTile, [&](const Row& e, int64_t begin, int64_t end) {
    const bool bf16 = e.flags & kParamBF16;
    if (e.ptr[kTeacher] != 0) {
      if (bf16) run_tile<__nv_bfloat16, true>(e, begin, end, c);
      else run_tile<float, true>(e, begin, end, c);
    } else {
      if (bf16) run_tile<__nv_bfloat16, false>(e, begin, end, c);
      else run_tile<float, false>(e, begin, end, c);
    }
  });
}

}  // namespace

void ema_update_cuda(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params,
                     const TeacherList& teacher, const EmaDecay& decay) {
  const c10::cuda::CUDAGuard guard(ema[0].device());
  const int n = static_cast<int>(ema.size());
  TORCH_CHECK(ema.size() < (1u << 30), "ema_update_: too many tensors (", ema.size(), ")");

  mt::HostTable<kSlots> table(n, kTile);
  for (int i = 0; i < n; ++i) {
    const void* e = ema[i].data_ptr();
    const void* p = params[i].data_ptr();
    const void* t = (!teacher.empty() && teacher[i].has_value()) ? teacher[i]->data_ptr() : nullptr;
    const bool aligned = mt::aligned16(e) && mt::aligned16(p) && (t == nullptr || mt::aligned16(t));
    table.add({e, p, t}, ema[i].numel(),
              (params[i].scalar_type() == at::kBFloat16 ? kParamBF16 : 0) | (aligned ? kAligned : 0));
  }
  if (table.tiles() == 0) return;
  const at::Tensor rows = table.upload(ema[0].device());

  static thread_local mt::ResidentGrid resident;
  const int dev = ema[0].device().index();
  const int grid = static_cast<int>(std::min<int64_t>(table.tiles(), resident.get(ema_multi_tensor_kernel, kThreads, dev)));
  ema_multi_tensor_kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      mt::HostTable<kSlots>::rows(rows), n, table.tiles(), Coeffs{decay.decay, decay.one_minus}, decay.ptr,
      decay.ptr_is_double);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mirai
