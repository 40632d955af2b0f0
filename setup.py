"""Build script.

The pure-Python package always builds. Compiled parts, when torch is importable at build time
(``pip install --no-build-isolation .``):

* ``selkd_kernels._C``: the C++ CPU ops, from every ``csrc/*.cpp`` (OpenMP, built with ninja).
  GPU kernels are written in Triton and compiled at run time; there is no CUDA C++ extension.

Environment flags (``1``/``true``/``yes`` to enable):

* ``SELKD_NO_EXTENSIONS``: build nothing compiled (pure-Python install; the torch backend runs).
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
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    cxx = CXX_FLAGS + (["-march=native"] if _flag("SELKD_NATIVE") else [])
    ext = CppExtension("selkd_kernels._C", cpp_sources, extra_compile_args=cxx,
                       extra_link_args=LINK_FLAGS)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
