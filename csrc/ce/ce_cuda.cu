// CUDA kernel of the cross-entropy row pass (see ce.cpp for the op, ce_math.h for the math).
//
// One block of 256 threads per row of logits z [C, V]:
//   1. each thread folds its elements (c = tid*VEC + k*256*VEC ..., 16-byte vector loads when
//      the row is 16-byte aligned and V a multiple of the vector width, else one element at a
//      time) into a running (max, sum of exp); warp shuffles, then shared memory, merge them;
//   2. thread 0 writes the row loss (lse - z[t]) * w;
//   3. when need_grad, the same threads rewrite their elements as (exp(z - lse) - [c == t]) * w
//      in the logits' dtype. The second read of the row (V * 2 bytes for bf16: 32 KB for
//      16,384 codes) mostly hits L1/L2.
// Traffic per row: about 2 reads + 1 write of the row, against the 5 full passes (and an fp32
// copy) of log_softmax + exp_ + scatter + scaling-cast in plain PyTorch.
// Dtypes: z float32 or bfloat16, row_w / row_loss float32, targets int64. A target outside
// [0, V) gives a NaN row loss (and NaN gradient) instead of an out-of-bounds read.
// Plain sm_80 instructions only.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>

#include "ce/ce_kernels.h"
#include "ce/ce_math.h"

namespace mirai {
namespace ce {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
struct Tag {
  using type = T;
};

// VEC elements loaded or stored as one access: 16 bytes when VEC = 16 / sizeof(T), one element when VEC = 1.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};
static_assert(sizeof(Vec<at::BFloat16, 1>) == 2 && sizeof(Vec<at::BFloat16, 8>) == 16, "Vec is exactly VEC elements");
static_assert(sizeof(Vec<float, 1>) == 4 && sizeof(Vec<float, 4>) == 16, "Vec is exactly VEC elements");

__device__ __forceinline__ ce_math::MaxSum<float> shfl_merge(ce_math::MaxSum<float> a) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    ce_math::MaxSum<float> b{__shfl_xor_sync(0xffffffffu, a.max, offset), __shfl_xor_sync(0xffffffffu, a.sum, offset)};
    a = ce_math::ce_merge(a, b);
  }
  return a;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
softmax_grad_kernel(T* __restrict__ z, const int64_t* __restrict__ targets, const float* __restrict__ row_w,
                    float* __restrict__ row_loss, int64_t V, bool need_grad) {
  __shared__ float s_max[kWarps], s_sum[kWarps];
  __shared__ float s_lse;
  T* row = z + static_cast<int64_t>(blockIdx.x) * V;
  const int tid = threadIdx.x;
  const int64_t stride = int64_t(kThreads) * VEC;

  auto ms = ce_math::ce_empty<float>();
  for (int64_t c = int64_t(tid) * VEC; c < V; c += stride) {
    const Vec<T, VEC> x = *reinterpret_cast<const Vec<T, VEC>*>(row + c);
#pragma unroll
    for (int k = 0; k < VEC; ++k) ce_math::ce_add(ms, static_cast<float>(x.v[k]));
  }
  ms = shfl_merge(ms);
  if ((tid & 31) == 0) {
    s_max[tid / 32] = ms.max;
    s_sum[tid / 32] = ms.sum;
  }
  __syncthreads();
  if (tid < 32) {
    auto a = tid < kWarps ? ce_math::MaxSum<float>{s_max[tid], s_sum[tid]} : ce_math::ce_empty<float>();
    a = shfl_merge(a);
    if (tid == 0) {
      const float lse = ce_math::ce_lse(a);
      const int64_t t = targets[blockIdx.x];
      const bool ok = t >= 0 && t < V;
      s_lse = ok ? lse : __int_as_float(0x7fc00000);  // NaN for a target outside [0, V)
      row_loss[blockIdx.x] =
          ok ? ce_math::ce_row_loss(lse, static_cast<float>(row[t]), row_w[blockIdx.x]) : s_lse;
    }
  }
  __syncthreads();  // row[t] is read before any thread overwrites it
  if (!need_grad) return;
  const float lse = s_lse, w = row_w[blockIdx.x];
  const int64_t t = targets[blockIdx.x];
  for (int64_t c = int64_t(tid) * VEC; c < V; c += stride) {
    Vec<T, VEC> x = *reinterpret_cast<const Vec<T, VEC>*>(row + c);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      x.v[k] = static_cast<T>(ce_math::ce_grad(static_cast<float>(x.v[k]), lse, c + k == t, w));
    }
    *reinterpret_cast<Vec<T, VEC>*>(row + c) = x;
  }
}

}  // namespace

void softmax_grad_cuda(const at::Tensor& z, const at::Tensor& targets, const at::Tensor& row_w,
                       const at::Tensor& row_loss, bool need_grad) {
  const int64_t C = z.size(0), V = z.size(1);
  if (C == 0) return;
  TORCH_CHECK(C <= int64_t(0x7fffffff), "ce_softmax_grad_: too many rows (", C, ")");
  const c10::cuda::CUDAGuard guard(z.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  auto run = [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    constexpr int VEC = 16 / sizeof(scalar_t);
    const bool vec = V % VEC == 0 && reinterpret_cast<uintptr_t>(z.data_ptr()) % 16 == 0;
    auto launch = [&](auto width) {
      constexpr int W = decltype(width)::value;
      softmax_grad_kernel<scalar_t, W><<<static_cast<unsigned>(C), kThreads, 0, stream>>>(
          z.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), row_w.data_ptr<float>(),
          row_loss.data_ptr<float>(), V, need_grad);
    };
    if (vec) {
      launch(std::integral_constant<int, VEC>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (z.scalar_type() == at::kBFloat16) {
    run(Tag<at::BFloat16>{});
  } else {
    run(Tag<float>{});
  }
}

}  // namespace ce
}  // namespace mirai
