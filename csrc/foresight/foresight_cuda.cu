// CUDA kernels of the fused foresight loss (contracts in foresight_kernels.h; the
// chunked algorithm and the GEMMs around them in foresight.cpp).
//
//   teacher_inv_norm  one warp per teacher row [B*S, C]: 1 / max(|t|, eps)
//   bias_silu         element-wise s = silu(a + bias) over [M, K*H], 16-byte vectors
//   loss              one warp per (token, head) row of y [M, K, C]: reads teacher[b, table[k,t]]
//                     through the table (never a gathered copy), forms |y|^2 and y.t in one
//                     pass, the cosine, the row loss and (second pass over the same, cached
//                     row) dY = -coeff_k/N_k * (t_hat - cos*y_hat)/|y|, written in place of y
//   silu_bwd          [M, K*H] tiles of kColsumRows rows x (256*VEC) columns: dz = ds*silu'(a+b)
//                     in place, optionally s = silu(a+b) in place of a, and per-tile column
//                     sums of dz (bias gradient partials, reduced by ATen: deterministic)
//   scale             in-place t *= scale for the autograd backward (no work when scale == 1)
//
// Dtypes: float32 or bfloat16 tensors (math in fp32); the teacher may be either, whatever
// the head dtype. Vector width: 16 bytes of the head dtype when the row length and all
// pointers allow it, else scalar. Portable CUDA (sm_80 and sm_90 alike): no arch-specific
// instructions.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <type_traits>

#include "foresight/foresight_kernels.h"
#include "foresight/foresight_math.h"

namespace mirai {
namespace foresight {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

// Elements per 16-byte vector of scalar_t when `len` and every pointer allow it, else 1.
template <typename scalar_t>
int vec_width(int64_t len, std::initializer_list<std::pair<const void*, int64_t>> ptrs_and_elem_bytes) {
  const int v = 16 / static_cast<int>(sizeof(scalar_t));
  if (len % v != 0) return 1;
  for (const auto& [p, eb] : ptrs_and_elem_bytes) {
    if (!aligned(p, v * eb)) return 1;
  }
  return v;
}

int64_t blocks_for(int64_t work_items, int64_t per_block) {
  return std::max<int64_t>(1, (work_items + per_block - 1) / per_block);
}

int grid_cap() {
  static const int cap = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 32;
  return cap;
}

#define FS_DISPATCH_FLOAT_BF16(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// ---------------------------------------------------------------- teacher inverse norms
template <typename T, int VEC>
__global__ void teacher_inv_norm_kernel(const T* __restrict__ teacher, float* __restrict__ out, int64_t rows,
                                        int64_t C) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const T* r = teacher + row * C;
  float sq = 0.f;
  for (int64_t c = static_cast<int64_t>(lane) * VEC; c < C; c += 32 * VEC) {
    const auto p = load_pack<T, VEC>(r + c);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float v = static_cast<float>(p.v[j]);
      sq += v * v;
    }
  }
  sq = warp_sum(sq);
  if (lane == 0) out[row] = fs_inv_norm(sq);
}

void teacher_inv_norm_cuda(const at::Tensor& teacher, const at::Tensor& inv_tn) {
  const int64_t rows = inv_tn.numel(), C = teacher.size(2);
  auto stream = at::cuda::getCurrentCUDAStream();
  FS_DISPATCH_FLOAT_BF16(teacher.scalar_type(), "foresight_teacher_inv_norm_cuda", [&] {
    const int vec = vec_width<scalar_t>(C, {{teacher.data_ptr(), sizeof(scalar_t)}});
    const auto grid = blocks_for(rows, kWarps);
    if (vec > 1) {
      teacher_inv_norm_kernel<scalar_t, 16 / sizeof(scalar_t)><<<grid, kThreads, 0, stream>>>(
          teacher.data_ptr<scalar_t>(), inv_tn.data_ptr<float>(), rows, C);
    } else {
      teacher_inv_norm_kernel<scalar_t, 1>
          <<<grid, kThreads, 0, stream>>>(teacher.data_ptr<scalar_t>(), inv_tn.data_ptr<float>(), rows, C);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------- bias + SiLU forward
// grid.x covers the columns (VEC per thread), grid.y strides over rows: no integer division.
template <typename T, int VEC>
__global__ void bias_silu_kernel(const T* __restrict__ a, const T* __restrict__ bias, T* __restrict__ s,
                                 int64_t rows, int64_t cols) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c >= cols) return;
  const auto bv = load_pack<T, VEC>(bias + c);
  float bf[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) bf[j] = static_cast<float>(bv.v[j]);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t e = r * cols + c;
    const auto av = load_pack<T, VEC>(a + e);
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = static_cast<T>(fs_silu(static_cast<float>(av.v[j]) + bf[j]));
    store_pack<T, VEC>(s + e, out);
  }
}

void bias_silu_cuda(const at::Tensor& a, const at::Tensor& bias, const at::Tensor& s) {
  const int64_t M = a.size(0), cols = a.size(1);
  if (M == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  FS_DISPATCH_FLOAT_BF16(a.scalar_type(), "foresight_bias_silu_cuda", [&] {
    const int vec = vec_width<scalar_t>(
        cols, {{a.data_ptr(), sizeof(scalar_t)}, {bias.data_ptr(), sizeof(scalar_t)}, {s.data_ptr(), sizeof(scalar_t)}});
    const int64_t col_blocks = blocks_for(cols / vec, kThreads);
    const dim3 grid(static_cast<unsigned>(col_blocks),
                    static_cast<unsigned>(std::min<int64_t>(M, std::max<int64_t>(1, grid_cap() / col_blocks))));
    if (vec > 1) {
      bias_silu_kernel<scalar_t, 16 / sizeof(scalar_t)><<<grid, kThreads, 0, stream>>>(
          a.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), M, cols);
    } else {
      bias_silu_kernel<scalar_t, 1><<<grid, kThreads, 0, stream>>>(a.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                                                                    s.data_ptr<scalar_t>(), M, cols);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------- loss (+ dY)
struct LossParams {
  const int64_t* table;
  const float* inv_tn;
  const float* grad_w;
  float* row_loss;
  int64_t rows;  // M * K
  int64_t ld;    // row stride of row_loss (>= K)
  int64_t K, C, S, T, m0;
  bool need_grad;
};

template <typename T, typename TT, int VEC>
__global__ void loss_kernel(T* __restrict__ y, const T* __restrict__ b3, const TT* __restrict__ teacher,
                            LossParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;  // row (m, k) of y [M, K, C]
  if (r >= p.rows) return;
  const int64_t m = r / p.K, k = r - m * p.K;
  int64_t b, t;
  fs_token_bt(p.m0 + m, p.T, b, t);
  const int64_t s = fs_target_row(p.table, k, t, p.T);
  T* yr = y + r * p.C;
  const int64_t c_begin = static_cast<int64_t>(lane) * VEC;
  if (s < 0) {  // no target: zero loss and zero gradient
    if (lane == 0) p.row_loss[m * p.ld + k] = 0.f;
    if (p.need_grad) {
      Pack<T, VEC> z;
#pragma unroll
      for (int j = 0; j < VEC; ++j) z.v[j] = static_cast<T>(0.f);
      for (int64_t c = c_begin; c < p.C; c += 32 * VEC) store_pack<T, VEC>(yr + c, z);
    }
    return;
  }
  const T* br = b3 + k * p.C;
  const TT* tr = teacher + (b * p.S + s) * p.C;
  float yy = 0.f, yt = 0.f;
  for (int64_t c = c_begin; c < p.C; c += 32 * VEC) {
    const auto yv = load_pack<T, VEC>(yr + c);
    const auto bv = load_pack<T, VEC>(br + c);
    const auto tv = load_pack<TT, VEC>(tr + c);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float v = static_cast<float>(yv.v[j]) + static_cast<float>(bv.v[j]);
      yy += v * v;
      yt += v * static_cast<float>(tv.v[j]);
    }
  }
  yy = warp_sum(yy);
  yt = warp_sum(yt);
  const CosRow<float> cr = fs_cos_row(yy, yt, p.inv_tn[b * p.S + s]);
  if (lane == 0) p.row_loss[m * p.ld + k] = -cr.cos;
  if (!p.need_grad) return;
  const float g = p.grad_w[k];
  for (int64_t c = c_begin; c < p.C; c += 32 * VEC) {
    const auto yv = load_pack<T, VEC>(yr + c);
    const auto bv = load_pack<T, VEC>(br + c);
    const auto tv = load_pack<TT, VEC>(tr + c);
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float v = static_cast<float>(yv.v[j]) + static_cast<float>(bv.v[j]);
      out.v[j] = static_cast<T>(fs_dcos_dy(v, static_cast<float>(tv.v[j]), cr, g));
    }
    store_pack<T, VEC>(yr + c, out);
  }
}

void loss_cuda(const LossChunk& a) {
  const int64_t M = a.row_loss.size(0), K = a.row_loss.size(1);
  if (M == 0) return;
  LossParams p;
  p.table = a.table.data_ptr<int64_t>();
  p.inv_tn = a.inv_tn.data_ptr<float>();
  p.grad_w = a.grad_w.data_ptr<float>();
  p.row_loss = a.row_loss.data_ptr<float>();
  p.rows = M * K;
  p.ld = a.row_loss.stride(0);
  p.K = K;
  p.C = a.b3.size(1);
  p.S = a.teacher.size(1);
  p.T = a.T;
  p.m0 = a.m0;
  p.need_grad = a.need_grad;
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto grid = blocks_for(p.rows, kWarps);
  FS_DISPATCH_FLOAT_BF16(a.y.scalar_type(), "foresight_loss_cuda", [&] {
    using y_t = scalar_t;
    FS_DISPATCH_FLOAT_BF16(a.teacher.scalar_type(), "foresight_loss_cuda_teacher", [&] {
      using t_t = scalar_t;
      constexpr int V = 16 / sizeof(y_t);
      const int vec = vec_width<y_t>(p.C, {{a.y.data_ptr(), sizeof(y_t)},
                                           {a.b3.data_ptr(), sizeof(y_t)},
                                           {a.teacher.data_ptr(), sizeof(t_t)}});
      if (vec > 1) {
        loss_kernel<y_t, t_t, V><<<grid, kThreads, 0, stream>>>(a.y.data_ptr<y_t>(), a.b3.data_ptr<y_t>(),
                                                                 a.teacher.data_ptr<t_t>(), p);
      } else {
        loss_kernel<y_t, t_t, 1><<<grid, kThreads, 0, stream>>>(a.y.data_ptr<y_t>(), a.b3.data_ptr<y_t>(),
                                                                 a.teacher.data_ptr<t_t>(), p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// ---------------------------------------------------------------- SiLU backward + bias-grad partials
template <typename T, int VEC, bool WRITE_S>
__global__ void silu_bwd_kernel(T* __restrict__ ds, T* __restrict__ a, const T* __restrict__ bias,
                                float* __restrict__ partial, int64_t M, int64_t cols, int64_t tiles) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= cols) return;
  const auto bv = load_pack<T, VEC>(bias + c0);
  float bf[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) bf[j] = static_cast<float>(bv.v[j]);
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    float acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
    const int64_t r_end = (tile + 1) * kColsumRows < M ? (tile + 1) * kColsumRows : M;
#pragma unroll 4
    for (int64_t r = tile * kColsumRows; r < r_end; ++r) {
      const int64_t e = r * cols + c0;
      const auto dv = load_pack<T, VEC>(ds + e);
      const auto av = load_pack<T, VEC>(a + e);
      Pack<T, VEC> dz, sv;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float z = static_cast<float>(av.v[j]) + bf[j];
        const float sg = fs_sigmoid(z);
        const float d = static_cast<float>(dv.v[j]) * (sg * (1.f + z * (1.f - sg)));  // fs_silu_grad, sigmoid shared
        dz.v[j] = static_cast<T>(d);
        if (WRITE_S) sv.v[j] = static_cast<T>(z * sg);
        acc[j] += d;
      }
      store_pack<T, VEC>(ds + e, dz);
      if (WRITE_S) store_pack<T, VEC>(a + e, sv);
    }
    float* prow = partial + tile * cols + c0;
#pragma unroll
    for (int j = 0; j < VEC; ++j) prow[j] = acc[j];
  }
}

void silu_bwd_cuda(const at::Tensor& ds, const at::Tensor& a, const at::Tensor& bias, const at::Tensor& partial,
                   bool write_s) {
  const int64_t M = ds.size(0), cols = ds.size(1);
  if (M == 0) return;
  const int64_t tiles = partial.size(0);
  auto stream = at::cuda::getCurrentCUDAStream();
  FS_DISPATCH_FLOAT_BF16(ds.scalar_type(), "foresight_silu_bwd_cuda", [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    const int vec = vec_width<scalar_t>(cols, {{ds.data_ptr(), sizeof(scalar_t)},
                                               {a.data_ptr(), sizeof(scalar_t)},
                                               {bias.data_ptr(), sizeof(scalar_t)}});
    const dim3 grid(static_cast<unsigned>(blocks_for(cols / vec, kThreads)),
                    static_cast<unsigned>(std::min<int64_t>(tiles, 65535)));
    auto launch = [&](auto vec_tag, auto write_tag) {
      constexpr int VV = decltype(vec_tag)::value;
      constexpr bool W = decltype(write_tag)::value;
      silu_bwd_kernel<scalar_t, VV, W><<<grid, kThreads, 0, stream>>>(
          ds.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), partial.data_ptr<float>(), M,
          cols, tiles);
    };
    if (vec > 1) {
      if (write_s) launch(std::integral_constant<int, V>{}, std::true_type{});
      else launch(std::integral_constant<int, V>{}, std::false_type{});
    } else {
      if (write_s) launch(std::integral_constant<int, 1>{}, std::true_type{});
      else launch(std::integral_constant<int, 1>{}, std::false_type{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------- in-place gradient scaling
// t *= *scale (fp32 math), where scale is a device scalar; every block returns at once when
// the scale is exactly 1 (the usual upstream gradient of a loss term), so nothing is read.
template <typename T, int VEC>
__global__ void scale_kernel(T* __restrict__ t, int64_t n_vec, const float* __restrict__ scale) {
  const float g = *scale;
  if (g == 1.f) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vec; i += stride) {
    auto v = load_pack<T, VEC>(t + i * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.v[j] = static_cast<T>(static_cast<float>(v.v[j]) * g);
    store_pack<T, VEC>(t + i * VEC, v);
  }
}

}  // namespace

void scale_inplace_cuda(const at::Tensor& t, const at::Tensor& scale) {
  const int64_t n = t.numel();
  if (n == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  FS_DISPATCH_FLOAT_BF16(t.scalar_type(), "foresight_scale_cuda", [&] {
    const int vec = vec_width<scalar_t>(n, {{t.data_ptr(), sizeof(scalar_t)}});
    const int64_t n_vec = n / vec;
    const auto grid = std::min<int64_t>(blocks_for(n_vec, kThreads), grid_cap());
    if (vec > 1) {
      scale_kernel<scalar_t, 16 / sizeof(scalar_t)>
          <<<grid, kThreads, 0, stream>>>(t.data_ptr<scalar_t>(), n_vec, scale.data_ptr<float>());
    } else {
      scale_kernel<scalar_t, 1><<<grid, kThreads, 0, stream>>>(t.data_ptr<scalar_t>(), n_vec, scale.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

const Kernels& cuda_kernels() {
  static const Kernels k{teacher_inv_norm_cuda, bias_silu_cuda, loss_cuda, silu_bwd_cuda};
  return k;
}

}  // namespace foresight
}  // namespace mirai
