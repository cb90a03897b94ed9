// Element math of the fused foresight loss, shared by the CPU kernels
// (foresight_cpu.cpp) and the CUDA kernels (foresight_cuda.cu) so both index the
// neighbour table and form the cosine and its gradient the same way.
//
// Conventions (see foresight.cpp for the whole algorithm):
//   token n in [0, B*T) of the flattened student h[B, T, D] is (b, t) = (n / T, n % T);
//   head k's target row for token n is s = table[k, t] (a row of teacher[b]); s < 0: no target.
//   acc_t is the math type: float for fp32/bf16 inputs, double for float64 (CPU only).
//
// Cosine with F.normalize semantics (x / max(|x|, eps), eps = 1e-6):
//   cos = (y . t) / (max(|y|, eps) * max(|t|, eps))
//   d cos / d y = (t_hat - cos * y / |y|) / |y|      when |y| > eps
//               = t_hat / eps                         when |y| <= eps (the clamp has no gradient)
//   with t_hat = t / max(|t|, eps) (the teacher is a constant: no gradient).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MIRAI_FS_HD __host__ __device__ __forceinline__
#else
#define MIRAI_FS_HD inline
#endif

namespace mirai {
namespace foresight {

// F.normalize's default-overridden eps used by the reference loss.
constexpr double kNormEps = 1e-6;

// Rows per tile of the column-sum partials written by the SiLU-backward kernels
// (bias gradients): partial[tile, col] = sum over the tile's rows.
constexpr int64_t kColsumRows = 16;

MIRAI_FS_HD float fs_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}
MIRAI_FS_HD double fs_exp(double x) { return exp(x); }

MIRAI_FS_HD float fs_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}
MIRAI_FS_HD double fs_sqrt(double x) { return sqrt(x); }

// Sigmoid, SiLU and SiLU's derivative of a pre-activation z (bias already added).
template <typename acc_t>
MIRAI_FS_HD acc_t fs_sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + fs_exp(-z));
}

template <typename acc_t>
MIRAI_FS_HD acc_t fs_silu(acc_t z) {
  return z * fs_sigmoid(z);
}

// d silu / dz = s * (1 + z * (1 - s)), s = sigmoid(z).
template <typename acc_t>
MIRAI_FS_HD acc_t fs_silu_grad(acc_t z) {
  const acc_t s = fs_sigmoid(z);
  return s * (acc_t(1) + z * (acc_t(1) - s));
}

// Student token n -> (b, t) of h[B, T, D].
MIRAI_FS_HD void fs_token_bt(int64_t n, int64_t T, int64_t& b, int64_t& t) {
  b = n / T;
  t = n - b * T;
}

// Teacher row of head k for student position t, or -1 (table is [K, T] contiguous).
MIRAI_FS_HD int64_t fs_target_row(const int64_t* table, int64_t k, int64_t t, int64_t T) {
  return table[k * T + t];
}

// 1 / max(|t|, eps) from the squared norm of a teacher row.
template <typename acc_t>
MIRAI_FS_HD acc_t fs_inv_norm(acc_t sq) {
  const acc_t n = fs_sqrt(sq);
  return acc_t(1) / (n > acc_t(kNormEps) ? n : acc_t(kNormEps));
}

// Per-row cosine terms from |y|^2 and y.t (t unnormalised) and the teacher row's 1/max(|t|,eps).
template <typename acc_t>
struct CosRow {
  acc_t cos;      // cosine similarity
  acc_t inv_dy;   // 1 / max(|y|, eps)
  acc_t inv_tn;   // 1 / max(|t|, eps)
  bool clamped;   // |y| <= eps: the norm clamp is active (no gradient through it)
};

template <typename acc_t>
MIRAI_FS_HD CosRow<acc_t> fs_cos_row(acc_t yy, acc_t yt, acc_t inv_tn) {
  CosRow<acc_t> r;
  const acc_t ny = fs_sqrt(yy);
  r.clamped = !(ny > acc_t(kNormEps));
  r.inv_dy = acc_t(1) / (r.clamped ? acc_t(kNormEps) : ny);
  r.inv_tn = inv_tn;
  r.cos = yt * r.inv_dy * inv_tn;
  return r;
}

// g * d cos / d y_c for one element (y_c, t_c) of the row; g is the loss weight
// (the caller passes g = -coeff_k / N_k, the gradient of coeff_k * mean(-cos)).
template <typename acc_t>
MIRAI_FS_HD acc_t fs_dcos_dy(acc_t y, acc_t t, const CosRow<acc_t>& r, acc_t g) {
  const acc_t that = t * r.inv_tn;
  const acc_t radial = r.clamped ? acc_t(0) : r.cos * y * r.inv_dy;
  return g * (that - radial) * r.inv_dy;
}

}  // namespace foresight
}  // namespace mirai
