// CUDA kernel of the fused multi-tensor AdamW + EMA step: one launch over all tensors.
//
// Algorithm (multi-tensor apply with a device-side table, common/multi_tensor.cuh):
//   * The host writes one 72-byte row per index (param, grad, exp_avg, exp_avg_sq,
//     ema, teacher pointers; numel; first tile; flags) plus a sentinel into pinned
//     memory, copied to the device asynchronously (no host sync).
//   * Each tensor is cut into tiles of kTile = 256 threads x 8 elements = 2048
//     elements, numbered globally in list order; a grid of (#SMs x resident blocks
//     per SM) blocks walks them grid-stride.
//   * Within a tile, if every pointer of the row is 16-byte aligned, each thread
//     issues all its 16-byte loads first (2 x float4 each of param, exp_avg,
//     exp_avg_sq [, ema]; one uint4 of bf16 grads or 2 x float4 of fp32 grads),
//     then computes and stores 8 elements; the < 8 leftover elements of a
//     tensor's last tile go through the scalar path. Misaligned rows (views at
//     odd offsets) use the scalar path throughout. Loads and stores use the
//     streaming cache hints (.cs).
//   * grad_scale, when given, is read by every block from device memory (no
//     host sync); grads are never written.
// Bytes per element: read grad (4 | 2) + param, exp_avg, exp_avg_sq (12) [+ ema 4],
// write param, exp_avg, exp_avg_sq (12) [+ ema 4] [+ teacher 2].
// Dtypes: param/exp_avg/exp_avg_sq/ema float32; grad float32 | bfloat16 (per
// tensor); teacher bfloat16 (per tensor, only with an ema). Element math and
// rounding: adamw_math.h (IEEE division and square root, no flush to zero
// despite --use_fast_math, so results equal the CPU kernel's bit for bit).
// Plain sm_80 instructions only (also runs on sm_90).
#include <algorithm>
#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/multi_tensor.cuh"
#include "optim/adamw_kernels.h"
#include "optim/adamw_math.h"

namespace mirai {
namespace {

namespace mt = multi_tensor;
using adamw_math::AdamWCoeffs;

constexpr int kThreads = 256;
constexpr int kVec = mt::kVec;
constexpr int64_t kTile = int64_t(kThreads) * kVec;

enum Slot { kParam, kGrad, kExpAvg, kExpAvgSq, kEma, kTeacher, kSlots };
enum : int64_t { kGradBF16 = 1, kAligned = 2 };
using Row = mt::Row<kSlots>;
static_assert(sizeof(Row) == 72, "one 72-byte table row per tensor");

// Typed pointers of one row.
template <typename G>
struct Tensors {
  float* p;
  const G* g;
  float* m;
  float* v;
  float* ema;
  __nv_bfloat16* teacher;

  __device__ explicit Tensors(const Row& r)
      : p(reinterpret_cast<float*>(r.ptr[kParam])),
        g(reinterpret_cast<const G*>(r.ptr[kGrad])),
        m(reinterpret_cast<float*>(r.ptr[kExpAvg])),
        v(reinterpret_cast<float*>(r.ptr[kExpAvgSq])),
        ema(reinterpret_cast<float*>(r.ptr[kEma])),
        teacher(reinterpret_cast<__nv_bfloat16*>(r.ptr[kTeacher])) {}
};

// How the gradient is unscaled: g / value when has_value.
struct Scale {
  float value;
  bool has_value;
};

template <typename G, bool kEma, bool kTeacher>
__device__ __forceinline__ void step1(const Tensors<G>& x, int64_t i, const AdamWCoeffs& c, Scale s) {
  float g = mt::load1(x.g, i);
  if (s.has_value) g = adamw_math::unscale(g, s.value);
  float p = __ldcs(x.p + i), m = __ldcs(x.m + i), v = __ldcs(x.v + i);
  adamw_math::adamw_step(p, m, v, g, c);
  __stcs(x.p + i, p);
  __stcs(x.m + i, m);
  __stcs(x.v + i, v);
  if (kEma) {
    const float e = adamw_math::ema_step(__ldcs(x.ema + i), p, c);
    __stcs(x.ema + i, e);
    if (kTeacher) mt::store1_bf16(x.teacher, i, e);
  }
}

// Elements [begin, end) of one aligned tensor: one 8-element vector per thread plus a scalar tail.
template <typename G, bool kEma, bool kTeacher>
__device__ __forceinline__ void tile_vector(const Tensors<G>& x, int64_t begin, int64_t end, const AdamWCoeffs& c,
                                            Scale s) {
  const int64_t vec_end = begin + ((end - begin) / kVec) * kVec;  // end of the full vectors
  const int64_t i = begin + int64_t(threadIdx.x) * kVec;
  if (i < vec_end) {
    float g[kVec], p[kVec], m[kVec], v[kVec], e[kVec];
    mt::load8(x.g + i, g);
    mt::load8(x.p + i, p);
    mt::load8(x.m + i, m);
    mt::load8(x.v + i, v);
    if (kEma) mt::load8(x.ema + i, e);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float gk = s.has_value ? adamw_math::unscale(g[k], s.value) : g[k];
      adamw_math::adamw_step(p[k], m[k], v[k], gk, c);
      if (kEma) e[k] = adamw_math::ema_step(e[k], p[k], c);
    }
    mt::store8(x.p + i, p);
    mt::store8(x.m + i, m);
    mt::store8(x.v + i, v);
    if (kEma) mt::store8(x.ema + i, e);
    if (kTeacher) mt::store8_bf16(x.teacher + i, e);
  }
  const int64_t j = vec_end + threadIdx.x;  // fewer than kVec leftover elements
  if (j < end) step1<G, kEma, kTeacher>(x, j, c, s);
}

// Elements [begin, end) of one misaligned tensor, one element per thread and step.
template <typename G, bool kEma, bool kTeacher>
__device__ __forceinline__ void tile_scalar(const Tensors<G>& x, int64_t begin, int64_t end, const AdamWCoeffs& c,
                                            Scale s) {
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) step1<G, kEma, kTeacher>(x, i, c, s);
}

template <typename G, bool kEma, bool kTeacher>
__device__ __forceinline__ void run_tile(const Row& r, int64_t begin, int64_t end, const AdamWCoeffs& c, Scale s) {
  const Tensors<G> x(r);
  if (r.flags & kAligned) {
    tile_vector<G, kEma, kTeacher>(x, begin, end, c, s);
  } else {
    tile_scalar<G, kEma, kTeacher>(x, begin, end, c, s);
  }
}

template <typename G>
__device__ __forceinline__ void dispatch_ema(const Row& r, int64_t begin, int64_t end, const AdamWCoeffs& c,
                                             Scale s) {
  if (r.ptr[kTeacher] != 0) run_tile<G, true, true>(r, begin, end, c, s);
  else if (r.ptr[kEma] != 0) run_tile<G, true, false>(r, begin, end, c, s);
  else run_tile<G, false, false>(r, begin, end, c, s);
}

__global__ void __launch_bounds__(kThreads)
adamw_ema_kernel(const Row* __restrict__ table, int n_tensors, int64_t n_tiles, AdamWCoeffs c,
                 const float* __restrict__ grad_scale) {
  const Scale s{grad_scale != nullptr ? *grad_scale : 1.f, grad_scale != nullptr};
  mt::for_each_tile(table, n_tensors, n_tiles, kTile, [&](const Row& r, int64_t begin, int64_t end) {
    if (r.flags & kGradBF16) dispatch_ema<__nv_bfloat16>(r, begin, end, c, s);
    else dispatch_ema<float>(r, begin, end, c, s);
  });
}

}  // namespace

void adamw_ema_step_cuda(const AdamWLists& lists, const AdamWCoeffs& coeffs, const float* grad_scale) {
  const at::Device device = lists.params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const int n = static_cast<int>(lists.params.size());
  TORCH_CHECK(lists.params.size() < (1u << 30), "adamw_ema_step_: too many tensors (", lists.params.size(), ")");

  mt::HostTable<kSlots> table(n, kTile);
  for (int i = 0; i < n; ++i) {
    const void* ptrs[kSlots] = {lists.params[i].data_ptr(), lists.grads[i].data_ptr(), lists.exp_avgs[i].data_ptr(),
                                lists.exp_avg_sqs[i].data_ptr(),
                                lists.has_ema(i) ? lists.ema[i]->data_ptr() : nullptr,
                                lists.has_teacher(i) ? lists.teacher[i]->data_ptr() : nullptr};
    bool aligned = true;
    for (const void* p : ptrs) aligned = aligned && (p == nullptr || mt::aligned16(p));
    const int64_t flags =
        (lists.grads[i].scalar_type() == at::kBFloat16 ? kGradBF16 : 0) | (aligned ? kAligned : 0);
    table.add({ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4], ptrs[5]}, lists.params[i].numel(), flags);
  }
  if (table.tiles() == 0) return;
  const at::Tensor rows = table.upload(device);

  static thread_local mt::ResidentGrid resident;
  const int grid =
      static_cast<int>(std::min<int64_t>(table.tiles(), resident.get(adamw_ema_kernel, kThreads, device.index())));
  adamw_ema_kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      mt::HostTable<kSlots>::rows(rows), n, table.tiles(), coeffs, grad_scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mirai
