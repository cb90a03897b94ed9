// Fused in-place multi-tensor EMA update: the checked op and its
// pybind11 registration.
//
//   _C.ema_update_(ema, params, teacher, decay, decay_tensor)
//     ema[i]     <- ema[i]*decay + params[i]*(1-decay)    (in place, one pass)
//     teacher[i] <- bf16(ema[i])                          (same pass, when given)
//
// ema: list of float32 tensors; params: float32 or bfloat16, same shapes per
// index; teacher: None or a list of the same length whose entries are bfloat16
// tensors or None (index without teacher). decay: a Python float in [0, 1], or
// decay_tensor: a one-element float32/float64 tensor on the ema's device (read by
// the kernel, so a CUDA decay causes no host sync). All tensors contiguous and on
// one device. CPU tensors run the C++ kernel (ema_cpu.cpp), CUDA tensors the
// multi-tensor CUDA kernel (ema_cuda.cu, one launch). Rounding: see ema_math.h.
#include <cmath>
#include <optional>
#include <vector>

#include <pybind11/stl.h>

#include "common/registry.h"
#include "ema/ema_kernels.h"

namespace mirai {
namespace {

void check_tensor(const at::Tensor& t, const char* list, size_t i, const at::Device& device,
                  const at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == device, "ema_update_: ", list, "[", i, "] is on ", t.device(),
              " but ema[0] is on ", device, "; all tensors must be on one device");
  TORCH_CHECK(t.sizes() == shape, "ema_update_: ", list, "[", i, "] has shape ", t.sizes(),
              " but ema[", i, "] has shape ", shape, "; shapes must match per index");
  TORCH_CHECK(t.is_contiguous(), "ema_update_: ", list, "[", i, "] must be contiguous");
}

void ema_update_(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params,
                 const std::optional<TeacherList>& teacher, double decay,
                 const std::optional<at::Tensor>& decay_tensor) {
  TORCH_CHECK(ema.size() == params.size(), "ema_update_: ema and params must have the same length, got ",
              ema.size(), " and ", params.size());
  if (teacher.has_value()) {
    TORCH_CHECK(teacher->size() == ema.size(), "ema_update_: teacher and ema must have the same length, got ",
                teacher->size(), " and ", ema.size());
  }
  if (ema.empty()) return;

  const at::Device device = ema[0].device();
  TORCH_CHECK(device.is_cpu() || device.is_cuda(), "ema_update_: tensors must be on CPU or CUDA, got ", device);
  for (size_t i = 0; i < ema.size(); ++i) {
    const at::Tensor& e = ema[i];
    TORCH_CHECK(e.scalar_type() == at::kFloat, "ema_update_: ema[", i, "] must be float32, got ",
                e.scalar_type());
    TORCH_CHECK(e.device() == device, "ema_update_: ema[", i, "] is on ", e.device(), " but ema[0] is on ",
                device, "; all tensors must be on one device");
    TORCH_CHECK(e.is_contiguous(), "ema_update_: ema[", i, "] must be contiguous");
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kBFloat16, "ema_update_: params[", i,
                "] must be float32 or bfloat16, got ", p.scalar_type());
    check_tensor(p, "params", i, device, e.sizes());
    if (teacher.has_value() && (*teacher)[i].has_value()) {
      const at::Tensor& t = *(*teacher)[i];
      TORCH_CHECK(t.scalar_type() == at::kBFloat16, "ema_update_: teacher[", i, "] must be bfloat16, got ",
                  t.scalar_type());
      check_tensor(t, "teacher", i, device, e.sizes());
    }
  }

  EmaDecay dec;
  if (decay_tensor.has_value()) {
    const at::Tensor& dt = *decay_tensor;
    TORCH_CHECK(dt.numel() == 1, "ema_update_: decay tensor must have one element, got ", dt.numel());
    TORCH_CHECK(dt.scalar_type() == at::kFloat || dt.scalar_type() == at::kDouble,
                "ema_update_: decay tensor must be float32 or float64, got ", dt.scalar_type());
    TORCH_CHECK(dt.device() == device, "ema_update_: decay tensor is on ", dt.device(), " but ema[0] is on ",
                device, "; it must be on the ema's device");
    dec.ptr = dt.data_ptr();
    dec.ptr_is_double = dt.scalar_type() == at::kDouble;
  } else {
    TORCH_CHECK(std::isfinite(decay) && decay >= 0.0 && decay <= 1.0,
                "ema_update_: decay must be in [0, 1], got ", decay);
    dec.decay = static_cast<float>(decay);
    dec.one_minus = static_cast<float>(1.0 - decay);
  }

  const TeacherList no_teacher;
  const TeacherList& t = teacher.has_value() ? *teacher : no_teacher;
  if (device.is_cpu()) {
    ema_update_cpu(ema, params, t, dec);
    return;
  }
#ifdef MIRAI_WITH_CUDA
  ema_update_cuda(ema, params, t, dec);
#else
  TORCH_CHECK(false, "ema_update_: this build of mirai._C has no CUDA kernels (built without nvcc)");
#endif
}

}  // namespace

void register_ema(pybind11::module_& m) {
  m.def("ema_update_", &ema_update_, pybind11::arg("ema"), pybind11::arg("params"), pybind11::arg("teacher"),
        pybind11::arg("decay"), pybind11::arg("decay_tensor"),
        "In place ema[i] = ema[i]*decay + params[i]*(1-decay) over lists of tensors in one pass "
        "(fp32 ema, fp32|bf16 params); optionally teacher[i] = bf16(ema[i]) in the same pass. "
        "decay_tensor (one-element float32/float64 on the ema's device), when given, replaces decay.");
}

}  // namespace mirai
