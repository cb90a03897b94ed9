// Kernels of the cross-entropy row pass, one per device (contract in ce.cpp).
#pragma once

#include <torch/extension.h>

namespace mirai {
namespace ce {

// z [C, V] contiguous (fp32 | bf16, and fp64 on the CPU), targets [C] int64 in [0, V),
// row_w [C] and row_loss [C] in acc dtype (fp32, fp64 for fp64 z). Writes row_loss and, when
// need_grad, the gradient of sum(row_loss) w.r.t. z over z.
void softmax_grad_cpu(const at::Tensor& z, const at::Tensor& targets, const at::Tensor& row_w,
                      const at::Tensor& row_loss, bool need_grad);
#ifdef MIRAI_WITH_CUDA
void softmax_grad_cuda(const at::Tensor& z, const at::Tensor& targets, const at::Tensor& row_w,
                       const at::Tensor& row_loss, bool need_grad);
#endif

}  // namespace ce
}  // namespace mirai
