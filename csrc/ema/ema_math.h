// Element math of the fused EMA update, shared by the CPU kernel (ema_cpu.cpp)
// and the CUDA kernel (ema_cuda.cu) so both round exactly the same way.
//
// Semantics (bit-exact with the PyTorch reference
//   ema.mul_(decay).add_(param.float(), alpha=1 - decay)
// on CPUs with FMA (ATen's AVX2/AVX-512 kernels) and on CUDA):
//   d  = float(decay)              (decay given as a double, rounded once)
//   a  = float(1.0 - decay)        (computed in double, as Python computes alpha)
//   ed = round_f32(ema * d)        (mul_: one rounded product)
//   ema' = fmaf(param, a, ed)      (add_ with alpha: ATen computes self + alpha*other,
//                                   which its vectorised CPU code and nvcc both fuse
//                                   into one FMA)
//   teacher = bf16_rne(ema')       (round to nearest even, like tensor.to(torch.bfloat16))
//
// The extension is compiled with nvcc --use_fast_math (flush-to-zero), which
// would flush denormal products; the rounding helpers (common/float_math.h) use
// inline PTX without .ftz so denormals behave like PyTorch's kernels (built
// without it).
#pragma once

#include "common/float_math.h"

namespace mirai {
namespace ema_math {

using fp::bf16_bits_to_float;
using fp::double_to_float_rn;
using fp::float_to_bf16_bits;
using fp::float_to_double;
using fp::fma_rn;
using fp::mul_rn;

// One EMA step: ema*decay + param*(1-decay) with the rounding described above.
MIRAI_HD float ema_step(float ema, float param, float decay, float one_minus_decay) {
  return fma_rn(param, one_minus_decay, mul_rn(ema, decay));
}

}  // namespace ema_math
}  // namespace mirai
