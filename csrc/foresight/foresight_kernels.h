// Element-wise and reduction kernels of the fused foresight loss, one set per device.
//
// The chunked driver in foresight.cpp runs every GEMM through ATen and calls these
// for everything else. Inputs reaching them are validated and contiguous; buffers are
// token-major: a chunk of M tokens is a row-major [M, K*X] matrix (head k's block of
// X = hidden or out_dim columns at offset k*X). acc_t = float (fp32/bf16 inputs) or
// double (float64, CPU only); the acc tensors below have that dtype.
#pragma once

#include <torch/extension.h>

namespace mirai {
namespace foresight {

// One chunk's loss pass over the heads of one group (K below: the group's head count; y,
// b3, table and grad_w hold only those heads): cosine of each (token, head) row against its teacher row, the
// per-row loss -cos (0 for rows without a target) and, when need_grad, dY in place of y.
struct LossChunk {
  at::Tensor y;         // [M, K*C] head outputs without b3 (input dtype); overwritten by dY when need_grad
  at::Tensor b3;        // [K, C] third-layer bias (input dtype), added in acc_t
  at::Tensor teacher;   // [B, S, C] (fp32 | bf16 | fp64 on CPU), read through the table
  at::Tensor inv_tn;    // [B, S] acc_t: 1 / max(|teacher row|, eps)
  at::Tensor table;     // [K, T] int64, values in [-1, S)
  at::Tensor grad_w;    // [K] acc_t: -coeff_k / N_k, the gradient of coeff_k * mean(-cos) per row
  at::Tensor row_loss;  // [M, K] acc_t output: -cos per row, 0 without target; unit column stride,
                        // any row stride >= K (a column slice of the [N, K_all] loss of all heads)
  int64_t m0 = 0;       // first flattened token (b*T + t) of the chunk
  int64_t T = 0;        // student positions per sequence
  bool need_grad = true;
};

struct Kernels {
  // inv_tn[b, s] = 1 / max(|teacher[b, s, :]|, eps)
  void (*teacher_inv_norm)(const at::Tensor& teacher, const at::Tensor& inv_tn);
  // s = silu(a + bias) for a, s [M, KH] and bias [KH] (input dtype; math in acc_t)
  void (*bias_silu)(const at::Tensor& a, const at::Tensor& bias, const at::Tensor& s);
  // the loss pass above
  void (*loss)(const LossChunk& args);
  // SiLU backward through z = a + bias, all [M, KH] / [KH]:
  //   ds <- ds * silu'(z) (in place; that is dz), and when write_s also a <- silu(z);
  //   partial[i, col] = sum of dz over rows [i*kColsumRows, (i+1)*kColsumRows) (acc_t,
  //   [ceil(M / kColsumRows), KH]) for the bias gradient.
  void (*silu_bwd)(const at::Tensor& ds, const at::Tensor& a, const at::Tensor& bias,
                   const at::Tensor& partial, bool write_s);
};

const Kernels& cpu_kernels();     // foresight_cpu.cpp
#ifdef MIRAI_WITH_CUDA
const Kernels& cuda_kernels();    // foresight_cuda.cu
// t *= scale in place (t fp32 | bf16 contiguous CUDA, scale a float32 scalar on t's device);
// returns without touching t when scale == 1.
void scale_inplace_cuda(const at::Tensor& t, const at::Tensor& scale);
#endif

}  // namespace foresight
}  // namespace mirai
