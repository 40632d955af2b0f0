"""Loading the compiled CPU extension, and compiling it just in time when none fits.

The C++ ops register themselves in the ``selkd`` namespace of ``torch.ops`` when their shared
object is loaded. This module finds one, in this order:

1. the prebuilt ``selkd_kernels._C`` that ``setup.py`` compiled, if its build record
   (``_build_info.py``) says it was built against this very torch (version, build, C++ ABI),
   this Python, and the C++ sources next to the package. A library built against another torch
   is never loaded: its ABI may not match, and once loaded its ops could not be replaced;
2. a just-in-time build in the cache folder (``SELKD_CACHE_DIR``, default
   ``~/.cache/selkd_kernels``), keyed by torch version, compiler, sources and switches; it is
   built there with ``torch.utils.cpp_extension.load`` (ninja) the first time, with a message,
   and loaded directly from then on, in every process;
3. otherwise the "cpp" backend is unavailable: the ImportError says why and exactly how to get
   it, and ``backend="auto"`` falls back to the PyTorch reference with that message as its
   warning. ``SELKD_NO_JIT=1`` turns step 2 off.

The compile flags are those of the wheel build (:mod:`selkd_kernels._build`): ``-O3`` without
debug information by default, ``SELKD_DEBUG=1`` for ``-O0 -g`` with assertions,
``SELKD_NATIVE=1`` for ``-march=native``.
"""
from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import json
import os
import sys
import threading
import time

import torch

from . import _build as B

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
JIT_NAME = "selkd_C"
RECORD_FILE = "selkd_build.json"
HEARTBEAT_S = 30.0

HOW_TO_GET_IT = ("To get the fast C++ path, either install a C++ compiler (g++ or clang++) and "
                 "ninja (pip install ninja) and run again: the kernels are then compiled once "
                 "and cached; or reinstall this package against your torch with `pip install "
                 "--no-build-isolation selkd-kernels` (from a source tree: `pip install "
                 "--no-build-isolation .`).")


def _note(msg: str) -> None:
    sys.stderr.write(msg.rstrip() + "\n")
    sys.stderr.flush()


def read_build_info(package_dir: str) -> dict | None:
    """The BUILD record of ``<package_dir>/_build_info.py`` (parsed, never executed)."""
    path = os.path.join(package_dir, "_build_info.py")
    try:
        with open(path) as fh:
            tree = ast.parse(fh.read(), path)
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == \
                ["BUILD"]:
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


def find_prebuilt(package_dir: str) -> str | None:
    """Path of ``_C`` for this interpreter in ``package_dir`` (its ABI-tagged file name)."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(package_dir, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def jit_blocker(environ, sources, compiler, ninja_ok: bool) -> str | None:
    """Why the just-in-time build cannot run here (None: it can)."""
    if B.env_flag(B.ENV_NO_JIT, environ):
        return f"compiling it at first use is turned off ({B.ENV_NO_JIT}=1; unset it to compile)"
    if not sources:
        return "no C++ sources ship with this installation to compile it from"
    if compiler is None:
        cxx = environ.get("CXX")
        where = f"CXX={cxx} does not run" if cxx else "no c++ on PATH; CXX names another"
        return f"no C++ compiler was found to compile it ({where})"
    if not ninja_ok:
        return "ninja, which the build needs, is not installed"
    return None


class Loader:
    """Finds or builds the extension of one package folder, once per process."""

    def __init__(self, package: str = "selkd_kernels", package_dir: str = PACKAGE_DIR,
                 environ=None):
        self.package = package
        self.package_dir = package_dir
        self.environ = os.environ if environ is None else environ
        self.origin: str | None = None   # "prebuilt", "jit-cache" or "jit-build" once loaded
        self.path: str | None = None
        self.error: str | None = None

    def load(self) -> str:
        """Load the ops (once); returns the origin, raises ImportError saying why not."""
        if self.origin is not None:
            return self.origin
        if self.error is not None:
            raise ImportError(self.error)
        try:
            self._load()
        except ImportError as exc:
            self.error = str(exc)
            raise
        return self.origin

    def _load(self) -> None:
        sources = B.source_files(self.package_dir)
        shash = B.sources_hash(sources) if sources else None
        why = self._try_prebuilt(shash)
        if why is None:
            return
        from torch.utils import cpp_extension
        compiler = B.find_compiler(self.environ)
        blocked = jit_blocker(self.environ, sources, compiler, cpp_extension.is_ninja_available())
        if blocked:
            raise ImportError(f"the C++ kernels cannot be loaded: {why}, and {blocked}. "
                              f"{HOW_TO_GET_IT}")
        record = B.record_for(torch, compiler, shash, self.environ)
        folder = os.path.join(B.cache_root(self.environ), "jit", B.cache_key(record))
        library = os.path.join(folder, JIT_NAME + ".so")
        if _cached_record(folder) == record and os.path.isfile(library):
            torch.ops.load_library(library)
            self.origin, self.path = "jit-cache", library
            return
        self._build(folder, record, compiler, sources, why)
        self.origin, self.path = "jit-build", library

    def _try_prebuilt(self, shash) -> str | None:
        """Load the prebuilt _C when it fits this process; else say why not."""
        path = find_prebuilt(self.package_dir)
        if path is None:
            return f"{self.package}._C is not built"
        mismatch = B.prebuilt_mismatch(read_build_info(self.package_dir), B.runtime_facts(torch),
                                       shash)
        if mismatch:
            return f"the installed {self.package}._C does not fit: {mismatch}"
        name = f"{self.package}._C"
        try:
            if name in sys.modules:
                self.origin, self.path = "prebuilt", path
                return None
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[name] = module
        except Exception as exc:  # noqa: BLE001 - a broken library is a reason, not a crash
            return f"loading {self.package}._C failed ({type(exc).__name__}: {exc})"
        self.origin, self.path = "prebuilt", path
        return None

    def _build(self, folder, record, compiler, sources, why) -> None:
        from torch.utils import cpp_extension
        flags, openmp = B.flags_for(compiler, record)
        os.makedirs(folder, exist_ok=True)
        _note(f"selkd_kernels: {why}.\n"
              f"selkd_kernels: compiling the C++ CPU kernels for torch {torch.__version__} with "
              f"{compiler.label} (once; about 1-2 minutes on 2 cores) into {folder}\n"
              f"selkd_kernels: ({B.ENV_NO_JIT}=1 skips this and runs the slower PyTorch "
              f"reference)")
        if openmp.note:
            _note(f"selkd_kernels: {openmp.note}")
        t0 = time.perf_counter()
        with _Heartbeat(t0):
            try:
                cpp_extension.load(name=JIT_NAME, sources=sources, extra_cflags=flags.cflags,
                                   extra_ldflags=flags.ldflags, build_directory=folder,
                                   is_python_module=False, verbose=False)
            except Exception as exc:
                log = os.path.join(folder, "build.log")
                with open(log, "w") as fh:
                    fh.write(str(exc))
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ImportError(f"the C++ kernels cannot be loaded: {why}, and compiling them "
                                  f"failed ({first[:200]}; full output in {log}). "
                                  f"{HOW_TO_GET_IT}") from exc
        _write_record(folder, {**record, "cflags": flags.cflags, "ldflags": flags.ldflags})
        _note(f"selkd_kernels: C++ kernels compiled in {time.perf_counter() - t0:.0f} s; later "
              f"runs load them from the cache")


class _Heartbeat:
    """A line on stderr every HEARTBEAT_S seconds while the compiler runs."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(HEARTBEAT_S):
            _note(f"selkd_kernels: still compiling ({time.perf_counter() - self.t0:.0f} s)")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _cached_record(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, RECORD_FILE)) as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    record.pop("cflags", None)
    record.pop("ldflags", None)
    return record


def _write_record(folder: str, record: dict) -> None:
    # written last and atomically: a record on disk means a complete library beside it
    tmp = os.path.join(folder, f".{RECORD_FILE}.{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(record, fh, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(folder, RECORD_FILE))


LOADER = Loader()


def extension_info() -> dict:
    """How the ops were loaded: ``origin`` ("prebuilt", "jit-cache", "jit-build" or None),
    ``path`` of the library, and ``error`` when they could not be."""
    return {"origin": LOADER.origin, "path": LOADER.path, "error": LOADER.error}


def require_ops(*names: str) -> None:
    """Raise ImportError unless every ``torch.ops.selkd.<name>`` is registered."""
    LOADER.load()
    missing = [n for n in names if not _has_op(n)]
    if missing:
        raise ImportError(f"the loaded C++ library ({LOADER.path}) lacks the ops {missing}: it "
                          f"is older than this package; rebuild it (pip install "
                          f"--no-build-isolation -e . in a source tree, or delete it to let the "
                          f"package compile a fresh one)")


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.selkd, name)
        return True
    except (AttributeError, RuntimeError):
        return False
