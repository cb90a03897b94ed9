// pybind11 entry point of the one extension `mirai._C`.
//
// Each kernel family lives in its own folder (csrc/ema, csrc/foresight, csrc/optim, csrc/ce) and
// exposes a `register_*` function that adds its CPU ops and, when the
// extension is built with nvcc (MIRAI_WITH_CUDA), its CUDA ops.
#include <torch/extension.h>

#include "common/registry.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "Mirai fused kernels: in-place multi-tensor EMA, the fused AdamW + EMA step, the fused foresight loss and "
      "the cross-entropy row pass of the fused linear + CE (CPU and CUDA).";
  m.def("has_cuda", []() {
#ifdef MIRAI_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the CUDA kernels were compiled into this build.");
  mirai::register_ema(m);
  mirai::register_foresight(m);
  mirai::register_optim(m);
  mirai::register_ce(m);
}
