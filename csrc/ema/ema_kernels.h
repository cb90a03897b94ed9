// Entry points of the fused EMA kernels, called by the checked op in ema.cpp.
//
// Inputs reaching these functions are already validated (ema.cpp): equal list
// lengths, equal shapes per index, ema fp32, params fp32|bf16, teacher bf16 (or
// absent per index), one device, all contiguous.
#pragma once

#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>

namespace mirai {

// How the decay reaches the kernel. Either the two rounded floats (decay given as
// a Python float) or a pointer to a one-element float32/float64 tensor on the
// ema's device, read by the kernel itself (no host sync); the kernel then forms
// decay = float(v), one_minus = float(1.0 - (double)v) exactly as on the host.
struct EmaDecay {
  float decay = 0.f;            // float(decay)
  float one_minus = 0.f;        // float(1.0 - decay), the difference taken in double
  const void* ptr = nullptr;    // device/host pointer to the decay value, or nullptr
  bool ptr_is_double = false;   // dtype of *ptr: float64 (true) or float32 (false)
};

// Teacher list: empty when no teacher is given; otherwise one entry per index,
// std::nullopt where that index has no teacher tensor.
using TeacherList = std::vector<std::optional<at::Tensor>>;

void ema_update_cpu(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params,
                    const TeacherList& teacher, const EmaDecay& decay);

#ifdef MIRAI_WITH_CUDA
void ema_update_cuda(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params,
                     const TeacherList& teacher, const EmaDecay& decay);
#endif

}  // namespace mirai
