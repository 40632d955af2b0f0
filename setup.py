"""Build script: the package, its C++ sources, and the compiled CPU extension when torch is here.

* With torch importable at build time (``pip install --no-build-isolation .``), every
  ``csrc/*.cpp`` is compiled into ``selkd_kernels._C`` (ninja), and ``selkd_kernels/_build_info.py``
  records the torch it was built against; at load time a different torch makes the package
  rebuild the kernels just in time instead of loading a mismatched library.
* Without torch (an isolated build, e.g. ``python -m build``), the wheel is pure Python and
  carries the C++ sources; the kernels are compiled on first use (needs a C++ compiler). A
  prominent warning says so.
* Installing with pip into an environment that has no torch stops with instructions: the
  ``torch`` dependency would otherwise make pip download a multi-GB CUDA build.

Compiler switches (``SELKD_DEBUG``, ``SELKD_NATIVE``, ``SELKD_NO_EXTENSIONS``) are documented in
``selkd_kernels/_build.py``; ``MAX_JOBS`` sets the parallel compile jobs (read by torch's ninja
builder).
"""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
ALLOW_TORCH_DOWNLOAD = "SELKD_ALLOW_TORCH_DOWNLOAD"


def _load_build_rules():
    # by path: importing the package would import torch
    spec = importlib.util.spec_from_file_location(
        "_selkd_build_rules", os.path.join(HERE, "selkd_kernels", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


rules = _load_build_rules()

NO_TORCH_MESSAGE = f"""
selkd-kernels: PyTorch is not installed in this environment.

  Installing it now through this package's dependency would make pip download the default PyPI
  build of torch, which on Linux is the CUDA build with several GB of nvidia-* packages. Install
  the torch you want first, then this package against it:

      pip install torch                   # or a CPU-only build from the PyTorch index
      pip install --no-build-isolation .  # compiles the C++ kernels against that torch

  (--no-build-isolation needs setuptools>=77, wheel and ninja in the environment.)
  To let pip pick torch itself after all, set {ALLOW_TORCH_DOWNLOAD}=1.
"""

NO_KERNELS_WARNING = f"""
{"!" * 94}
WARNING (selkd-kernels): torch is not importable in this build environment, so this wheel
contains NO compiled C++ kernels (an isolated build, such as plain `python -m build` or
`pip install .`, cannot see the torch you installed).
  * The wheel carries the C++ sources: on first use the kernels are compiled just in time
    against the torch found then (needs a C++ compiler; cached; SELKD_NO_JIT=1 turns it off
    and leaves the slower PyTorch reference).
  * To compile them now instead, build where torch is installed:
        pip install --no-build-isolation .     or     python -m build --no-isolation
{"!" * 94}
"""


def _banner(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def _pip_is_building() -> bool:
    # pip exports its build tracker to every build-backend call (pip >= 22.1; older pips used
    # PIP_REQ_TRACKER). Other frontends (python -m build, uv) only build, so they never stop here.
    return bool(os.environ.get("PIP_BUILD_TRACKER") or os.environ.get("PIP_REQ_TRACKER"))


def _target_has_torch() -> bool:
    """Whether the interpreter pip installs into has torch, seen from outside pip's isolated
    build environment (which hides the target's site-packages through PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"
    try:
        return subprocess.run([sys.executable, "-c", probe], env=env, timeout=120,
                              check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _import_torch():
    try:
        import torch
        from torch.utils import cpp_extension  # noqa: F401
    except ImportError:
        return None
    return torch


class BuildPyWithSources(build_py):
    """Also ships ``csrc/*.cpp`` as ``selkd_kernels/_csrc/``, the sources of the JIT build, and
    never a ``_build_info.py`` left in the source tree by an in-place build (it describes that
    tree's _C, not this build's)."""

    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir)
                if m[:2] != ("selkd_kernels", "_build_info")]

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install finds csrc/ beside the package
        dest = os.path.join(self.build_lib, "selkd_kernels", "_csrc")
        os.makedirs(dest, exist_ok=True)
        for src in sorted(glob.glob(os.path.join(HERE, "csrc", "*.cpp"))):
            shutil.copy2(src, dest)


def _extension_build(torch):
    """(ext_modules, cmdclass) for the compiled extension against the importable torch."""
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    compiler = rules.find_compiler()
    if compiler is None:
        raise SystemExit("selkd-kernels: no C++ compiler found ($CXX or c++); install g++ or "
                         "clang++, or set SELKD_NO_EXTENSIONS=1 for a pure-Python build")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    record = rules.record_for(torch, compiler, rules.sources_hash(sources))
    flags, openmp = rules.flags_for(compiler, record)
    if openmp.note:
        _banner(f"selkd-kernels: {openmp.note}\n")
    record.update(cflags=flags.cflags, ldflags=flags.ldflags)

    class BuildExtWithRecord(BuildExtension.with_options(use_ninja=True)):
        def run(self):
            super().run()
            out_dir = os.path.dirname(self.get_ext_fullpath("selkd_kernels._C"))
            rules.write_build_info(os.path.join(out_dir, "_build_info.py"), record)

    ext = CppExtension("selkd_kernels._C", sources, extra_compile_args=flags.cflags,
                       extra_link_args=flags.ldflags)
    return [ext], {"build_ext": BuildExtWithRecord}


def _configure():
    cmdclass = {"build_py": BuildPyWithSources}
    torch = _import_torch()
    if torch is None and _pip_is_building() and not rules.env_flag(ALLOW_TORCH_DOWNLOAD) and \
            not _target_has_torch():
        raise SystemExit(NO_TORCH_MESSAGE)
    if rules.env_flag(rules.ENV_NO_EXTENSIONS):
        return [], cmdclass
    if torch is None:
        if any(cmd in sys.argv for cmd in ("bdist_wheel", "build_ext", "editable_wheel")):
            _banner(NO_KERNELS_WARNING)
        return [], cmdclass
    ext_modules, ext_cmd = _extension_build(torch)
    cmdclass.update(ext_cmd)
    return ext_modules, cmdclass


ext_modules, cmdclass = _configure()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
