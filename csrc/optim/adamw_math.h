// Element math of the fused AdamW + EMA step, shared by the CPU kernel
// (adamw_cpu.cpp) and the CUDA kernel (adamw_cuda.cu) so both round exactly the
// same way (bit for bit, NaN payloads aside).
//
// Per element, all in float32, every operation rounded once to nearest even
// (fp::*_rn, no fast math, no flush to zero):
//   g     = grad / grad_scale                 (only when a grad_scale is given; the
//                                              grad tensor itself is not written)
//   p     = p * wd_factor                     wd_factor = float(1 - lr*weight_decay)
//   m     = fma(1-beta1, g, beta1*m)          beta1*m + (1-beta1)*g
//   v     = fma((1-beta2)*g, g, beta2*v)      beta2*v + (1-beta2)*g*g
//   denom = sqrt(v) / bc2_sqrt + eps          bc2_sqrt = float(sqrt(bias_correction2))
//   p     = fma(-step_size, m / denom, p)     step_size = float(lr / bias_correction1)
//   ema   = ema_math::ema_step(ema, p, d, 1-d)        (with the NEW p; ema_math.h)
//   teacher = bf16_rne(ema)
// The scalar coefficients are computed on the host in double and rounded once to
// float (AdamWCoeffs), as PyTorch does when a Python float meets a float32 tensor.
//
// Versus torch.optim.AdamW (foreach=False), which runs the same formulas as
// separate ops: m there is exp_avg.lerp_(g, 1-beta1) and the products/sums are
// rounded separately where this code fuses them, so results agree to within a
// few float32 ulps, not bit for bit. The EMA part is bit-exact with running
// mirai.ops.ema_update_ on the updated parameters.
#pragma once

#include "common/float_math.h"
#include "ema/ema_math.h"

namespace mirai {
namespace adamw_math {

// Float coefficients of one call, rounded once from the host's doubles.
struct AdamWCoeffs {
  float beta1;            // float(beta1)
  float one_minus_beta1;  // float(1 - beta1)
  float beta2;            // float(beta2)
  float one_minus_beta2;  // float(1 - beta2)
  float wd_factor;        // float(1 - lr * weight_decay)
  float neg_step_size;    // float(-(lr / bias_correction1))
  float bc2_sqrt;         // float(sqrt(bias_correction2))
  float eps;              // float(eps)
  float ema_decay;        // float(ema_decay)
  float ema_one_minus;    // float(1 - ema_decay)
};

// One AdamW step of one element, in place; g is the (already unscaled) gradient.
MIRAI_HD void adamw_step(float& p, float& m, float& v, float g, const AdamWCoeffs& c) {
  p = fp::mul_rn(p, c.wd_factor);
  m = fp::fma_rn(c.one_minus_beta1, g, fp::mul_rn(c.beta1, m));
  v = fp::fma_rn(fp::mul_rn(c.one_minus_beta2, g), g, fp::mul_rn(c.beta2, v));
  const float denom = fp::add_rn(fp::div_rn(fp::sqrt_rn(v), c.bc2_sqrt), c.eps);
  p = fp::fma_rn(c.neg_step_size, fp::div_rn(m, denom), p);
}

// The gradient the step uses: grad / grad_scale.
MIRAI_HD float unscale(float grad, float grad_scale) { return fp::div_rn(grad, grad_scale); }

// The EMA of the updated parameter (ema_math.h).
MIRAI_HD float ema_step(float ema, float p, const AdamWCoeffs& c) {
  return ema_math::ema_step(ema, p, c.ema_decay, c.ema_one_minus);
}

}  // namespace adamw_math
}  // namespace mirai
