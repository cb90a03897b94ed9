// CPU kernel of the cross-entropy row pass (see ce.cpp for the op, ce_math.h for the math):
// rows in parallel (at::parallel_for); per row one pass for the running (max, sum) and the
// loss, a second pass writing the gradient over the logits. Same math as the CUDA kernel.
// The row's (max, sum) is kept as kPartials interleaved partials merged at the end, as the
// CUDA kernel merges its threads' partials: one float32 running sum over 16,384 logits drifts
// by up to about 6e-5 of the log-sum-exp, 16 partials by about 4e-6.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "ce/ce_kernels.h"
#include "ce/ce_math.h"

namespace mirai {
namespace ce {
namespace {

constexpr int64_t kPartials = 16;

template <typename scalar_t>
void softmax_grad_impl(const at::Tensor& z, const at::Tensor& targets, const at::Tensor& row_w,
                       const at::Tensor& row_loss, bool need_grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = z.size(0), V = z.size(1);
  scalar_t* zp = z.data_ptr<scalar_t>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  const acc_t* wp = row_w.data_ptr<acc_t>();
  acc_t* lp = row_loss.data_ptr<acc_t>();
  at::parallel_for(0, C, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* row = zp + r * V;
      ce_math::MaxSum<acc_t> part[kPartials];
      for (auto& p : part) p = ce_math::ce_empty<acc_t>();
      for (int64_t c = 0; c < V; ++c) ce_math::ce_add(part[c % kPartials], static_cast<acc_t>(row[c]));
      auto ms = part[0];
      for (int64_t k = 1; k < kPartials; ++k) ms = ce_math::ce_merge(ms, part[k]);
      const acc_t lse = ce_math::ce_lse(ms), w = wp[r];
      const int64_t t = tp[r];
      lp[r] = ce_math::ce_row_loss(lse, static_cast<acc_t>(row[t]), w);
      if (!need_grad) continue;
      for (int64_t c = 0; c < V; ++c) {
        row[c] = static_cast<scalar_t>(ce_math::ce_grad(static_cast<acc_t>(row[c]), lse, c == t, w));
      }
    }
  });
}

}  // namespace

void softmax_grad_cpu(const at::Tensor& z, const at::Tensor& targets, const at::Tensor& row_w,
                      const at::Tensor& row_loss, bool need_grad) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "ce_softmax_grad_cpu", [&] {
    softmax_grad_impl<scalar_t>(z, targets, row_w, row_loss, need_grad);
  });
}

}  // namespace ce
}  // namespace mirai
