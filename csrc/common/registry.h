// Registration hooks of the kernel families, called from csrc/bindings.cpp.
#pragma once
#include <torch/extension.h>

namespace mirai {
void register_ema(pybind11::module_& m);        // csrc/ema/ema.cpp
void register_foresight(pybind11::module_& m);  // csrc/foresight/foresight.cpp
void register_optim(pybind11::module_& m);      // csrc/optim/adamw.cpp
void register_ce(pybind11::module_& m);         // csrc/ce/ce.cpp
}  // namespace mirai
