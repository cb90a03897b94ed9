"""Build of the one extension ``mirai._C``.

C++ (CPU) sources under ``csrc/`` are always compiled. The ``.cu`` sources are compiled
according to ``MIRAI_BUILD_CUDA``:

* ``auto`` (default): when nvcc is found (``CUDA_HOME``) AND a CUDA GPU is visible. On a machine
  without a GPU they could never run, and compiling them is most of the build time there.
* ``1``: whenever nvcc is found; a missing nvcc is an error (CI sets this, so a ``.cu`` that does
  not compile fails CI even though CI has no GPU).
* ``0``: never (CPU kernels only).

CUDA targets: ``TORCH_CUDA_ARCH_LIST`` or by default ``8.0;9.0+PTX`` (A100 and H100 binaries, PTX
for newer GPUs). ``MAX_JOBS`` defaults to what free memory allows (about 3 GB per nvcc job).
Objects are kept in ``build/temp`` so a rebuild only compiles what changed, and
``python setup.py build_ext --inplace`` (what ``make install`` runs first, to show progress) and
the editable ``pip install`` share them.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
ARCHS = "8.0;9.0+PTX"       # default CUDA targets: A100, H100, and PTX for newer GPUs


def _free_memory_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: line.split()[1] for line in f}
        return int(info.get("MemAvailable", info["MemFree"])) / 1e6
    except (OSError, KeyError, ValueError):
        return 8.0


def _cuda_library_includes() -> list[str]:
    """pip's CUDA 13 torch keeps cuBLAS/cuSPARSE headers in site-packages/nvidia/cu13/include."""
    spec = importlib.util.find_spec("nvidia")
    dirs = []
    for base in (spec.submodule_search_locations or []) if spec else []:
        inc = os.path.join(base, "cu13", "include")
        if os.path.isdir(inc):
            dirs.append(inc)
    return dirs


def _locate_cuda_home() -> None:
    """Point CUDA_HOME at a toolkit folder that has headers and libcudart.

    torch guesses CUDA_HOME from `which nvcc`; when nvcc is a wrapper script
    (e.g. /usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc) that guess lacks
    include/ and lib64/, so look at the usual toolkit folders first.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates += ["/usr/local/cuda"]
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def _gpu_visible() -> bool:
    import torch
    try:
        return torch.cuda.device_count() > 0
    except Exception:  # noqa: BLE001 - a broken driver is no GPU for this purpose
        return False


def _build_cuda(cuda_home: str | None) -> tuple[bool, str]:
    """Whether to compile the .cu sources (``MIRAI_BUILD_CUDA``, see the module docstring) and why."""
    mode = os.environ.get("MIRAI_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"MIRAI_BUILD_CUDA={mode!r}: expected auto, 0 or 1")
    if mode == "0":
        return False, "MIRAI_BUILD_CUDA=0: CPU kernels only"
    if cuda_home is None:
        if mode == "1":
            raise SystemExit("MIRAI_BUILD_CUDA=1 but no CUDA toolkit (nvcc) was found: set CUDA_HOME")
        return False, "no CUDA toolkit found: CPU kernels only"
    if mode == "1":
        return True, f"MIRAI_BUILD_CUDA=1: CUDA kernels for {os.environ.get('TORCH_CUDA_ARCH_LIST', ARCHS)}"
    if not _gpu_visible():
        return False, "no GPU visible: CPU kernels only (MIRAI_BUILD_CUDA=1 compiles the CUDA kernels too)"
    return True, f"GPU visible: CUDA kernels for {os.environ.get('TORCH_CUDA_ARCH_LIST', ARCHS)}"


def _extension():
    _locate_cuda_home()
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    with_cuda, why = _build_cuda(CUDA_HOME)
    print(f"mirai._C: {len(cpp)} C++ sources" + (f" + {len(cu)} CUDA sources" if with_cuda else "")
          + f" ({why})", file=sys.stderr, flush=True)
    include_dirs = [os.path.join(ROOT, "csrc")]
    # torch.utils.cpp_extension adds the C++ standard its headers need; OpenMP makes at::parallel_for parallel
    # -ffp-contract=off: no FMA contraction of a * b + c in the CPU kernels, which must round every operation as
    # their CUDA twins do (csrc/common/float_math.h; tests compare them bit for bit)
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if not with_cuda:
        return CppExtension("mirai._C", cpp, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                            extra_link_args=["-fopenmp"])
    # A100 and H100 binaries, plus compute_90 PTX that newer GPUs compile when they load the extension
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ARCHS)
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__"]
    return CUDAExtension(
        "mirai._C", cpp + cu,
        include_dirs=include_dirs + _cuda_library_includes(),
        define_macros=[("MIRAI_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx + ["-DMIRAI_WITH_CUDA=1"], "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, int(_free_memory_gb() // 3)))))

    class Build(BuildExtension):
        """torch's BuildExtension with objects in ROOT/build/temp (incremental, shared by every build command)."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", "temp")

    return Build.with_options(use_ninja=True)


setup(
    packages=find_packages(include=["mirai", "mirai.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": _build_ext()},
)
