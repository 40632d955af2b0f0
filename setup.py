"""Build script.

The pure-Python package always builds. Compiled parts, when torch is importable at build time
(``pip install --no-build-isolation .``):

* ``selkd_kernels._C``: the C++ CPU ops, from every ``csrc/*.cpp`` (OpenMP, built with ninja).
* ``selkd_kernels._C_cuda``: CUDA ops from ``csrc/cuda/*.cu`` (plus ``csrc/python_module.cpp``),
  only when such sources exist, torch is a CUDA build and nvcc is found (``CUDA_HOME``).

Environment flags (``1``/``true``/``yes`` to enable):

* ``SELKD_NO_EXTENSIONS``: build nothing compiled (pure-Python install; the torch backend runs).
* ``SELKD_NO_CUDA``: skip the CUDA extension even where it could be built.
* ``SELKD_FORCE_CUDA``: build the CUDA extension even without a visible GPU (e.g. in a container
  that builds wheels); fails loudly if torch has no CUDA or nvcc is missing.
* ``SELKD_CUDA_ARCHS``: forwarded as ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0"``).
* ``SELKD_NATIVE``: compile the CPU code with ``-march=native`` (faster, not portable; the default
  build dispatches between ISA levels at run time instead).
* ``MAX_JOBS``: parallel compile jobs (read by torch's ninja builder).
"""
import glob
import os

from setuptools import setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


# -fno-trapping-math lets GCC if-convert the clamps in the vectorised exp (no code here relies on
# floating-point exception flags); -ffp-contract=fast allows FMA where ISO mode would forbid it.
# NaN and inf semantics are kept (no -ffast-math): NaN inputs must surface as NaN losses.
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math", "-ffp-contract=fast"]
LINK_FLAGS = ["-fopenmp"]


def _extensions():
    if _flag("SELKD_NO_EXTENSIONS"):
        return [], {}
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cpp_sources and not cuda_sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,
                                               CUDAExtension)
    except ImportError:
        if _flag("SELKD_FORCE_CUDA"):
            raise RuntimeError("SELKD_FORCE_CUDA=1 but torch is not importable at build time; "
                               "install torch first and build with --no-build-isolation")
        return [], {}

    cxx = CXX_FLAGS + (["-march=native"] if _flag("SELKD_NATIVE") else [])
    exts = []
    if cpp_sources:
        exts.append(CppExtension("selkd_kernels._C", cpp_sources, extra_compile_args=cxx,
                                 extra_link_args=LINK_FLAGS))

    if cuda_sources and not _flag("SELKD_NO_CUDA"):
        have_cuda = torch.version.cuda is not None and CUDA_HOME is not None
        if _flag("SELKD_FORCE_CUDA") and not have_cuda:
            raise RuntimeError("SELKD_FORCE_CUDA=1 needs a CUDA build of torch "
                               f"(torch.version.cuda={torch.version.cuda}) and nvcc "
                               f"(CUDA_HOME={CUDA_HOME})")
        if have_cuda:
            if os.environ.get("SELKD_CUDA_ARCHS"):
                os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["SELKD_CUDA_ARCHS"]
            module_src = [os.path.join("csrc", "python_module.cpp")]
            host_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
            exts.append(CUDAExtension(
                "selkd_kernels._C_cuda", cuda_sources + host_sources + module_src,
                extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                    "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr",
                                             "-lineinfo"]}))
    if not exts:
        return [], {}
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
