// Row math of the cross-entropy pass (softmax statistics, loss and logit gradient of one
// row), shared by the CPU kernel (ce_cpu.cpp) and the CUDA kernel (ce_cuda.cu).
//
// For a row z[0..V) of logits, its target t and its weight w (1 / #valid rows, 0 for an
// ignored row):
//   (m, s)  running max and sum of exp(z - m), merged across elements and threads with
//           ce_merge (the order differs between CPU and CUDA; the value does not beyond
//           rounding)
//   lse     = m + log(s)
//   loss    = (lse - z[t]) * w                 = -log_softmax(z)[t] * w
//   grad[c] = (exp(z[c] - lse) - [c == t]) * w = d loss / d z[c]
// All in acc_t (float for float32 / bfloat16 logits, double for float64 ones). On CUDA
// exp and log are the fast-math intrinsics (relative error about 2^-21), which the bf16
// gradient written back cannot resolve.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define MIRAI_CE_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define MIRAI_CE_HD __attribute__((always_inline)) inline
#else
#define MIRAI_CE_HD inline
#endif

namespace mirai {
namespace ce_math {

template <typename acc_t>
struct MaxSum {
  acc_t max;  // running maximum (-inf before the first element)
  acc_t sum;  // sum of exp(x - max) over the elements seen
};

template <typename acc_t>
MIRAI_CE_HD MaxSum<acc_t> ce_empty() {
  return {-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
}

// Adds one element to a running (max, sum). A -inf element adds nothing (exp(-inf) = 0): the
// test keeps exp(-inf - -inf) = NaN out of a sum that has seen only -inf so far. NaN still
// propagates (it fails both comparisons).
template <typename acc_t>
MIRAI_CE_HD void ce_add(MaxSum<acc_t>& a, acc_t x) {
  if (x > a.max) {
    a.sum = a.sum * std::exp(a.max - x) + acc_t(1);
    a.max = x;
  } else if (x != -std::numeric_limits<acc_t>::infinity()) {
    a.sum += std::exp(x - a.max);
  }
}

// Merges two running (max, sum) pairs; an empty side leaves the other unchanged.
template <typename acc_t>
MIRAI_CE_HD MaxSum<acc_t> ce_merge(MaxSum<acc_t> a, MaxSum<acc_t> b) {
  if (b.sum == acc_t(0)) return a;
  if (a.sum == acc_t(0)) return b;
  const acc_t m = a.max > b.max ? a.max : b.max;
  return {m, a.sum * std::exp(a.max - m) + b.sum * std::exp(b.max - m)};
}

template <typename acc_t>
MIRAI_CE_HD acc_t ce_lse(MaxSum<acc_t> a) {
  return a.max + std::log(a.sum);
}

// -log_softmax(z)[t] * w from the row's log-sum-exp and its target logit.
template <typename acc_t>
MIRAI_CE_HD acc_t ce_row_loss(acc_t lse, acc_t z_target, acc_t w) {
  return (lse - z_target) * w;
}

// d loss / d z[c]: (softmax(z)[c] - [c == t]) * w.
template <typename acc_t>
MIRAI_CE_HD acc_t ce_grad(acc_t z, acc_t lse, bool is_target, acc_t w) {
  return (std::exp(z - lse) - (is_target ? acc_t(1) : acc_t(0))) * w;
}

}  // namespace ce_math
}  // namespace mirai
