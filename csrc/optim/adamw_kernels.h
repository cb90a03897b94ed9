// Entry points of the fused AdamW + EMA kernels, called by the checked op in adamw.cpp.
//
// Inputs reaching these functions are already validated (adamw.cpp): equal list
// lengths, equal shapes per index, params/exp_avgs/exp_avg_sqs/ema float32, grads
// float32|bf16, teacher bf16 only where ema is given, one device, all contiguous,
// grad_scale (when given) a one-element float32 tensor on that device.
#pragma once

#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>

#include "optim/adamw_math.h"

namespace mirai {

// Tensor lists of one call. ema / teacher: empty when not given; otherwise one entry
// per index, std::nullopt where that index has none.
struct AdamWLists {
  const std::vector<at::Tensor>& params;
  const std::vector<at::Tensor>& grads;
  const std::vector<at::Tensor>& exp_avgs;
  const std::vector<at::Tensor>& exp_avg_sqs;
  const std::vector<std::optional<at::Tensor>>& ema;
  const std::vector<std::optional<at::Tensor>>& teacher;

  bool has_ema(size_t i) const { return !ema.empty() && ema[i].has_value(); }
  bool has_teacher(size_t i) const { return !teacher.empty() && teacher[i].has_value(); }
};

// grad_scale: pointer to the one float32 on the tensors' device, or nullptr (no unscaling).
void adamw_ema_step_cpu(const AdamWLists& lists, const adamw_math::AdamWCoeffs& coeffs, const float* grad_scale);

#ifdef MIRAI_WITH_CUDA
void adamw_ema_step_cuda(const AdamWLists& lists, const adamw_math::AdamWCoeffs& coeffs, const float* grad_scale);
#endif

}  // namespace mirai
