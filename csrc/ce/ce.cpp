// Cross-entropy row pass of the fused linear + cross-entropy (mirai/ops/linear_ce.py): the
// checked op and its pybind11 registration.
//
//   _C.ce_softmax_grad_(z, targets, row_w, need_grad) -> row_loss
//     z [C, V] logits of one chunk of rows (contiguous; float32 or bfloat16, float64 on the CPU),
//     targets [C] int64 in [0, V), row_w [C] weights (float32; float64 for float64 z):
//     row_loss[r] = -log_softmax(z[r])[targets[r]] * row_w[r]            (returned, acc dtype)
//     z[r, c]     = (softmax(z[r])[c] - [c == targets[r]]) * row_w[r]    (in place, need_grad)
//   i.e. the loss of the chunk and its gradient w.r.t. the logits, written over the logits in
//   their own dtype: one read for the row statistics and one read + write for the gradient,
//   where log_softmax + exp_ + scatter_add_ + a scaling cast take five passes and an fp32 copy.
//   Softmax statistics, loss and gradient in fp32 (fp64 for fp64): ce_math.h, shared by the CPU
//   kernel (ce_cpu.cpp, rows in parallel) and the CUDA kernel (ce_cuda.cu, one block per row).
// Targets: checked on the CPU (a clear error); on CUDA (no host sync) a target outside [0, V)
// gives a NaN row loss and gradient.
#include <c10/core/DeviceGuard.h>

#include "ce/ce_kernels.h"
#include "common/registry.h"

namespace mirai {
namespace ce {
namespace {

at::Tensor softmax_grad_(const at::Tensor& z, const at::Tensor& targets, const at::Tensor& row_w, bool need_grad) {
  TORCH_CHECK(z.dim() == 2, "ce_softmax_grad_: z must be [C, V], got shape ", z.sizes());
  const int64_t C = z.size(0), V = z.size(1);
  TORCH_CHECK(V >= 1, "ce_softmax_grad_: z must have at least one column (V >= 1), got shape ", z.sizes());
  TORCH_CHECK(z.is_contiguous(), "ce_softmax_grad_: z must be contiguous (it is overwritten with the gradient)");
  const bool cuda = z.is_cuda();
  TORCH_CHECK(cuda || z.device().is_cpu(), "ce_softmax_grad_: z must be on the CPU or a CUDA device, got ",
              z.device());
  const auto dt = z.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || (!cuda && dt == at::kDouble),
              "ce_softmax_grad_: z must be float32 or bfloat16", cuda ? "" : " (or float64 on the CPU)", ", got ", dt);
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == C, "ce_softmax_grad_: targets must be [C] = [", C,
              "], got shape ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "ce_softmax_grad_: targets must be int64, got ",
              targets.scalar_type());
  TORCH_CHECK(row_w.dim() == 1 && row_w.size(0) == C, "ce_softmax_grad_: row_w must be [C] = [", C,
              "], got shape ", row_w.sizes());
  TORCH_CHECK(row_w.scalar_type() == acc, "ce_softmax_grad_: row_w must be ", acc, " for ", dt, " logits, got ",
              row_w.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"targets", &targets}, {"row_w", &row_w}}) {
    TORCH_CHECK(t->device() == z.device(), "ce_softmax_grad_: ", name, " is on ", t->device(), " but z is on ",
                z.device());
    TORCH_CHECK(t->is_contiguous(), "ce_softmax_grad_: ", name, " must be contiguous");
  }
  if (!cuda && C > 0) {
    const auto mm = at::aminmax(targets);
    const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < V, "ce_softmax_grad_: targets must lie in [0, V) = [0, ", V, "), got values in [",
                lo, ", ", hi, "]");
  }
  c10::DeviceGuard guard(z.device());
  auto row_loss = at::empty({C}, z.options().dtype(acc));
  if (cuda) {
#ifdef MIRAI_WITH_CUDA
    softmax_grad_cuda(z, targets, row_w, row_loss, need_grad);
#else
    TORCH_CHECK(false, "ce_softmax_grad_: mirai._C was built without CUDA kernels");
#endif
  } else {
    softmax_grad_cpu(z, targets, row_w, row_loss, need_grad);
  }
  return row_loss;
}

}  // namespace
}  // namespace ce

void register_ce(pybind11::module_& m) {
  m.def("ce_softmax_grad_", &ce::softmax_grad_,
        "ce_softmax_grad_(z [C, V], targets [C] int64, row_w [C], need_grad) -> row_loss [C]: the loss "
        "-log_softmax(z)[t] * w of each row and, when need_grad, its gradient w.r.t. z written over z "
        "(see csrc/ce/ce.cpp).",
        pybind11::arg("z"), pybind11::arg("targets"), pybind11::arg("row_w"), pybind11::arg("need_grad"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace mirai
