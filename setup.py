"""Build script: the pure-Python package always; the C++ CPU extension (selkd_kernels._C) from
csrc/*.cpp when torch is importable at build time (pip install --no-build-isolation .)."""
import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources and os.environ.get("SELKD_NO_EXTENSIONS", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(CppExtension(
        "selkd_kernels._C", sources,
        extra_compile_args=["-O3", "-fopenmp", "-std=c++17"],
        extra_link_args=["-fopenmp"]))
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
