// Fused multi-tensor AdamW step + model-EMA update: the checked op and its
// pybind11 registration.
//
//   _C.adamw_ema_step_(params, grads, exp_avgs, exp_avg_sqs, ema, teacher, lr, beta1, beta2, eps,
//                      weight_decay, bias_correction1, bias_correction2, grad_scale, ema_decay)
//     per element, in one pass (math and rounding: adamw_math.h):
//     g = grad / grad_scale;  p *= 1 - lr*wd;  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g
//     p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
//     ema[i] = ema*d + p*(1-d) with the new p; teacher[i] = bf16(ema[i])   (where given)
//
// params, exp_avgs, exp_avg_sqs: float32; grads: float32 or bfloat16; all lists the
// same length with the same shape per index (any shape, empty allowed). ema: None or a
// list whose entries are float32 tensors or None; teacher: None or a list of bfloat16
// tensors or None, only where ema is given. grad_scale: None or a one-element float32
// tensor on the params' device (read by the kernel: no host sync); grads are not
// written back. Scalars are host doubles; bias_correction1/2 = 1 - beta1/2**step,
// computed by the caller in double. ema_decay in [0, 1] is required when any ema is
// given. All tensors contiguous, on one CPU or CUDA device. CPU tensors run
// adamw_cpu.cpp, CUDA tensors adamw_cuda.cu (one launch).
#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include <pybind11/stl.h>

#include "common/registry.h"
#include "optim/adamw_kernels.h"

namespace mirai {
namespace {

using OptionalTensors = std::vector<std::optional<at::Tensor>>;

// dtype, device, shape (vs params[i]) and layout of lists[i].
void check_entry(const at::Tensor& t, const char* list, size_t i, const at::Tensor& param,
                 const at::Device& device, bool allow_bf16, at::ScalarType only = at::kFloat) {
  if (allow_bf16) {
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "adamw_ema_step_: ", list, "[",
                i, "] must be float32 or bfloat16, got ", t.scalar_type());
  } else {
    TORCH_CHECK(t.scalar_type() == only, "adamw_ema_step_: ", list, "[", i, "] must be ",
                only == at::kFloat ? "float32" : "bfloat16", ", got ", t.scalar_type());
  }
  TORCH_CHECK(t.device() == device, "adamw_ema_step_: ", list, "[", i, "] is on ", t.device(),
              " but params[0] is on ", device, "; all tensors must be on one device");
  TORCH_CHECK(t.sizes() == param.sizes(), "adamw_ema_step_: ", list, "[", i, "] has shape ", t.sizes(),
              " but params[", i, "] has shape ", param.sizes(), "; shapes must match per index");
  TORCH_CHECK(t.is_contiguous(), "adamw_ema_step_: ", list, "[", i, "] must be contiguous");
}

void check_length(size_t n, const char* list, size_t n_params) {
  TORCH_CHECK(n == n_params, "adamw_ema_step_: ", list, " and params must have the same length, got ", n, " and ",
              n_params);
}

adamw_math::AdamWCoeffs make_coeffs(double lr, double beta1, double beta2, double eps, double weight_decay,
                                    double bias_correction1, double bias_correction2, double ema_decay) {
  TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, "adamw_ema_step_: lr must be finite and >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, "adamw_ema_step_: beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, "adamw_ema_step_: beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, "adamw_ema_step_: eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(weight_decay), "adamw_ema_step_: weight_decay must be finite, got ", weight_decay);
  TORCH_CHECK(bias_correction1 > 0.0 && bias_correction1 <= 1.0,
              "adamw_ema_step_: bias_correction1 (1 - beta1**step) must be in (0, 1], got ", bias_correction1);
  TORCH_CHECK(bias_correction2 > 0.0 && bias_correction2 <= 1.0,
              "adamw_ema_step_: bias_correction2 (1 - beta2**step) must be in (0, 1], got ", bias_correction2);
  adamw_math::AdamWCoeffs c;
  c.beta1 = static_cast<float>(beta1);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.wd_factor = static_cast<float>(1.0 - lr * weight_decay);
  c.neg_step_size = static_cast<float>(-(lr / bias_correction1));
  c.bc2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  c.eps = static_cast<float>(eps);
  c.ema_decay = static_cast<float>(ema_decay);
  c.ema_one_minus = static_cast<float>(1.0 - ema_decay);
  return c;
}

void adamw_ema_step_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                     const std::optional<OptionalTensors>& ema, const std::optional<OptionalTensors>& teacher,
                     double lr, double beta1, double beta2, double eps, double weight_decay, double bias_correction1,
                     double bias_correction2, const std::optional<at::Tensor>& grad_scale,
                     std::optional<double> ema_decay) {
  const size_t n = params.size();
  check_length(grads.size(), "grads", n);
  check_length(exp_avgs.size(), "exp_avgs", n);
  check_length(exp_avg_sqs.size(), "exp_avg_sqs", n);
  if (ema.has_value()) check_length(ema->size(), "ema", n);
  if (teacher.has_value()) {
    TORCH_CHECK(ema.has_value(), "adamw_ema_step_: teacher is given but ema is None; the teacher is written from the ema");
    check_length(teacher->size(), "teacher", n);
  }
  const bool any_ema = ema.has_value() && std::any_of(ema->begin(), ema->end(), [](const auto& e) { return e.has_value(); });
  if (any_ema) {
    TORCH_CHECK(ema_decay.has_value(), "adamw_ema_step_: ema_decay is required when ema is given");
    TORCH_CHECK(std::isfinite(*ema_decay) && *ema_decay >= 0.0 && *ema_decay <= 1.0,
                "adamw_ema_step_: ema_decay must be in [0, 1], got ", *ema_decay);
  }
  const adamw_math::AdamWCoeffs coeffs = make_coeffs(lr, beta1, beta2, eps, weight_decay, bias_correction1,
                                                     bias_correction2, ema_decay.value_or(0.0));
  if (n == 0) return;

  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cpu() || device.is_cuda(), "adamw_ema_step_: tensors must be on CPU or CUDA, got ", device);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_entry(p, "params", i, p, device, /*allow_bf16=*/false);
    check_entry(grads[i], "grads", i, p, device, /*allow_bf16=*/true);
    check_entry(exp_avgs[i], "exp_avgs", i, p, device, false);
    check_entry(exp_avg_sqs[i], "exp_avg_sqs", i, p, device, false);
    const bool has_ema = ema.has_value() && (*ema)[i].has_value();
    if (has_ema) check_entry(*(*ema)[i], "ema", i, p, device, false);
    if (teacher.has_value() && (*teacher)[i].has_value()) {
      TORCH_CHECK(has_ema, "adamw_ema_step_: teacher[", i, "] is given but ema[", i,
                  "] is None; the teacher is written from the ema");
      check_entry(*(*teacher)[i], "teacher", i, p, device, false, at::kBFloat16);
    }
  }
  const float* scale = nullptr;
  if (grad_scale.has_value()) {
    const at::Tensor& s = *grad_scale;
    TORCH_CHECK(s.numel() == 1, "adamw_ema_step_: grad_scale must have one element, got ", s.numel(),
                " (shape ", s.sizes(), ")");
    TORCH_CHECK(s.scalar_type() == at::kFloat, "adamw_ema_step_: grad_scale must be float32, got ", s.scalar_type());
    TORCH_CHECK(s.device() == device, "adamw_ema_step_: grad_scale is on ", s.device(), " but params[0] is on ",
                device, "; it must be on the params' device");
    scale = s.data_ptr<float>();
  }

  const OptionalTensors none;
  const AdamWLists lists{params, grads, exp_avgs, exp_avg_sqs, ema.has_value() ? *ema : none,
                         teacher.has_value() ? *teacher : none};
  if (device.is_cpu()) {
    adamw_ema_step_cpu(lists, coeffs, scale);
    return;
  }
#ifdef MIRAI_WITH_CUDA
  adamw_ema_step_cuda(lists, coeffs, scale);
#else
  TORCH_CHECK(false, "adamw_ema_step_: this build of mirai._C has no CUDA kernels (built without nvcc)");
#endif
}

}  // namespace

void register_optim(pybind11::module_& m) {
  using pybind11::arg;
  m.def("adamw_ema_step_", &adamw_ema_step_, arg("params"), arg("grads"), arg("exp_avgs"), arg("exp_avg_sqs"),
        arg("ema"), arg("teacher"), arg("lr"), arg("beta1"), arg("beta2"), arg("eps"), arg("weight_decay"),
        arg("bias_correction1"), arg("bias_correction2"), arg("grad_scale"), arg("ema_decay"),
        "In place AdamW step over lists of fp32 tensors in one pass (grads fp32|bf16, divided by the "
        "one-element device tensor grad_scale when given, not written back), then, where ema[i] is given, "
        "ema[i] = ema[i]*ema_decay + params[i]*(1-ema_decay) with the new params and teacher[i] = bf16(ema[i]).");
}

}  // namespace mirai
