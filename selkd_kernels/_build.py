"""How the C++ CPU extension ``selkd_kernels._C`` is compiled, in one place for the wheel build
(``setup.py``) and the just-in-time build at first use (:mod:`selkd_kernels._extension`).
``CMakeLists.txt`` mirrors the same switches by hand.

This module imports neither torch nor the rest of the package at import time: ``setup.py`` loads
it by file path, before either may be importable.

Environment switches (``1``/``true``/``yes``/``on`` enable):

* ``SELKD_DEBUG``: ``-O0 -g`` with assertions (``NDEBUG`` undefined, libstdc++ checks), unstripped.
  The default is ``-O3`` without debug information, and a stripped shared object.
* ``SELKD_NATIVE``: ``-march=native`` (fastest on the build machine, not portable). Without it
  the hot loops are compiled for several x86-64 levels and the best one is picked at load time.
* ``SELKD_NO_EXTENSIONS``: setup.py builds no compiled code (pure-Python wheel).
* ``SELKD_NO_JIT``: never compile at first use; without a usable prebuilt ``_C`` the slower
  PyTorch reference runs.
* ``SELKD_CACHE_DIR``: where the just-in-time builds live (default
  ``$XDG_CACHE_HOME/selkd_kernels`` or ``~/.cache/selkd_kernels``).
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field

ENV_DEBUG = "SELKD_DEBUG"
ENV_NATIVE = "SELKD_NATIVE"
ENV_NO_EXTENSIONS = "SELKD_NO_EXTENSIONS"
ENV_NO_JIT = "SELKD_NO_JIT"
ENV_CACHE_DIR = "SELKD_CACHE_DIR"

# Bumped when the meaning of a build record changes, so older records never match.
RECORD_FORMAT = 1


def env_flag(name: str, environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------- sources

def source_files(package_dir: str) -> list[str]:
    """The C++ sources: ``<package>/_csrc`` in an installed package (setup.py copies them there
    so a wheel can rebuild its kernels), else ``csrc/`` beside the package in a source tree."""
    for folder in (os.path.join(package_dir, "_csrc"),
                   os.path.join(os.path.dirname(package_dir), "csrc")):
        files = sorted(glob.glob(os.path.join(folder, "*.cpp")))
        if files:
            return files
    return []


def sources_hash(paths) -> str:
    """Content hash of the sources (names and bytes, order-independent)."""
    h = hashlib.sha256()
    for path in sorted(paths, key=os.path.basename):
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as fh:
            h.update(fh.read())
        h.update(b"\0")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- compiler

@dataclass(frozen=True)
class Compiler:
    path: str
    kind: str      # "gcc", "clang" or "other"
    version: str   # e.g. "12.2.0"; "" when the version text was not understood

    @property
    def label(self) -> str:
        return f"{self.kind} {self.version}".strip()


def classify_compiler(version_text: str) -> tuple[str, str]:
    """(kind, version) from the output of ``<compiler> --version``."""
    first = version_text.strip().splitlines()[0] if version_text.strip() else ""
    m = re.search(r"clang version (\d+(?:\.\d+)*)", version_text)
    if m:
        return "clang", m.group(1)
    if re.search(r"\b(g\+\+|gcc|GCC)\b", first) or "Free Software Foundation" in version_text:
        m = re.search(r"(\d+\.\d+(?:\.\d+)?)\s*$", first) or re.search(r"(\d+\.\d+\.\d+)", first)
        return "gcc", m.group(1) if m else ""
    return "other", ""


def find_compiler(environ=None) -> Compiler | None:
    """The C++ compiler torch.utils.cpp_extension will call (``$CXX``, else ``c++``), or None
    when there is none."""
    environ = os.environ if environ is None else environ
    words = shlex.split(environ.get("CXX", "c++")) or ["c++"]
    exe = shutil.which(words[0])
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    kind, version = classify_compiler(out.stdout + out.stderr)
    return Compiler(os.path.realpath(exe), kind, version)


# ----------------------------------------------------------------------------- OpenMP

def openmp_runtime_of(library_names) -> str | None:
    """"gnu", "llvm" or "intel": the OpenMP runtime among these shared-library names."""
    kinds = set()
    for name in library_names:
        base = os.path.basename(name)
        if base.startswith("libgomp"):
            kinds.add("gnu")
        elif base.startswith("libiomp"):
            kinds.add("intel")
        elif base.startswith("libomp"):
            kinds.add("llvm")
    for kind in ("gnu", "llvm", "intel"):
        if kind in kinds:
            return kind
    return None


def torch_openmp_runtime(torch_module) -> str | None:
    """The OpenMP runtime torch runs its own threads on: the one loaded into this process (Linux),
    else the one shipped in torch/lib; None when neither shows one."""
    try:
        with open("/proc/self/maps") as fh:
            found = openmp_runtime_of(line.split()[-1] for line in fh if "/" in line)
        if found:
            return found
    except OSError:
        pass
    lib = os.path.join(os.path.dirname(torch_module.__file__), "lib")
    return openmp_runtime_of(os.listdir(lib)) if os.path.isdir(lib) else None


@dataclass(frozen=True)
class OpenMP:
    cflags: tuple = ()
    ldflags: tuple = ()
    threads: bool = False
    note: str = ""


_OMP_PROBE = """#include <omp.h>
int main() { int n = 0;
#pragma omp parallel reduction(+ : n)
  n += omp_get_num_threads() > 0;
  return n > 0 ? 0 : 1; }
"""
_SIMD_PROBE = """float f(const float* x, int n) { float s = 0;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) s += x[i];
  return s; }
"""


def probe(compiler: Compiler, flags, *, link: bool) -> bool:
    """Whether ``compiler`` accepts ``flags`` on a small OpenMP program (and links it)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as fh:
            fh.write(_OMP_PROBE if link else _SIMD_PROBE)
        cmd = [compiler.path, *flags, src, "-o", os.path.join(tmp, "probe.out")]
        if not link:
            cmd.insert(1, "-c")
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.SubprocessError):
            return False
        return out.returncode == 0 and "warning" not in out.stderr.lower()


def choose_openmp(compiler_kind: str, torch_runtime: str | None, probe_fn) -> OpenMP:
    """OpenMP flags for the extension. Its parallel loops (at::parallel_for) are OpenMP regions
    compiled into the extension itself, so they must run on the runtime torch already uses: two
    runtimes in one process are two thread pools, and torch.set_num_threads would reach only one.
    GCC emits calls to the GNU runtime, clang to LLVM's; on a mismatch, or without OpenMP, the
    build is serial and keeps only the vectorisation pragmas (``-fopenmp-simd``, no runtime).

    ``probe_fn(flags, link)`` says whether the compiler accepts the flags."""
    emits = {"gcc": "gnu", "clang": "llvm"}.get(compiler_kind)
    reason = None
    if emits is None:
        reason = "unknown compiler: OpenMP not attempted"
    elif torch_runtime is not None and torch_runtime != emits:
        reason = (f"torch runs on the {torch_runtime} OpenMP runtime and this {compiler_kind} "
                  f"would link the {emits} one")
    elif probe_fn(("-fopenmp",), True):
        return OpenMP(("-fopenmp",), ("-fopenmp",), True, "")
    else:
        reason = "the compiler cannot build OpenMP code (-fopenmp failed)"
    # SELKD_OPENMP_SIMD tells the sources the pragmas are understood (GCC defines no macro)
    simd = ("-fopenmp-simd", "-DSELKD_OPENMP_SIMD") if probe_fn(("-fopenmp-simd",), False) \
        else ()
    return OpenMP(simd, (), False, f"single-threaded build: {reason}")


# ----------------------------------------------------------------------------- flags

# -fno-trapping-math lets the compiler if-convert the clamps in the vectorised exp (no code here
# relies on floating-point exception flags); -ffp-contract=fast allows FMA where ISO mode would
# forbid it. NaN and inf semantics are kept (no -ffast-math): NaN inputs must surface as NaN.
_CODEGEN = ("-fno-trapping-math", "-ffp-contract=fast")
# Python's own CFLAGS, which setuptools passes first, carry -g (7 MB of debug information in a
# 0.6 MB library): -g0 undoes it.
_RELEASE = ("-O3", "-g0")
_DEBUG = ("-O0", "-g", "-UNDEBUG", "-D_GLIBCXX_ASSERTIONS")


@dataclass(frozen=True)
class Flags:
    cflags: list = field(default_factory=list)
    ldflags: list = field(default_factory=list)


def compile_flags(*, debug: bool, native: bool, openmp: OpenMP, platform: str = sys.platform
                  ) -> Flags:
    """Compiler and linker flags. No ``-std=``: torch.utils.cpp_extension adds the standard the
    installed torch's headers need (C++17 up to torch 2.9, C++20 after)."""
    cflags = list(_DEBUG if debug else _RELEASE) + list(_CODEGEN)
    if native:
        cflags.append("-march=native")
    cflags += list(openmp.cflags)
    ldflags = list(openmp.ldflags)
    if not debug and platform.startswith("linux"):
        ldflags.append("-s")  # strip the symbol table as well (7.4 MB -> 0.6 MB with -g0)
    return Flags(cflags, ldflags)


# ----------------------------------------------------------------------------- records

def runtime_facts(torch_module) -> dict:
    """What a compiled _C must have been built against to load into this process."""
    return {
        "torch": torch_module.__version__,
        "torch_git": getattr(torch_module.version, "git_version", ""),
        "cxx11_abi": bool(getattr(torch_module._C, "_GLIBCXX_USE_CXX11_ABI", True)),
        "python": sys.implementation.cache_tag,
        "platform": sysconfig.get_platform(),
    }


def build_record(torch_module, compiler: Compiler, *, debug: bool, native: bool,
                 sources: str, openmp_runtime: str | None) -> dict:
    """Everything the compiled object depends on: the runtime facts, the sources, the compiler
    and the switches. Stored beside every build; the JIT cache is keyed by it."""
    record = {"format": RECORD_FORMAT, **runtime_facts(torch_module), "sources": sources,
              "compiler": compiler.label, "compiler_path": compiler.path,
              "debug": bool(debug), "native": bool(native), "openmp_runtime": openmp_runtime}
    return record


def record_for(torch_module, compiler: Compiler, sources: str, environ=None) -> dict:
    """The :func:`build_record` of a build now: switches from the environment, OpenMP runtime
    from ``torch_module`` (setup.py and the JIT loader describe their builds alike)."""
    return build_record(torch_module, compiler, debug=env_flag(ENV_DEBUG, environ),
                        native=env_flag(ENV_NATIVE, environ), sources=sources,
                        openmp_runtime=torch_openmp_runtime(torch_module))


def flags_for(compiler: Compiler, record: dict) -> tuple[Flags, OpenMP]:
    """Compile and link flags of the build ``record`` describes, and the OpenMP choice behind
    them (probes the compiler: only when a build really runs)."""
    openmp = choose_openmp(compiler.kind, record["openmp_runtime"],
                           lambda f, link: probe(compiler, f, link=link))
    return compile_flags(debug=record["debug"], native=record["native"], openmp=openmp), openmp


def prebuilt_mismatch(record: dict | None, facts: dict, sources: str | None) -> str | None:
    """Why a prebuilt _C described by ``record`` must not be loaded here (None: it may).
    ``sources`` is the hash of the sources next to the package, when there are any."""
    if record is None:
        return "it carries no build record (built by an older setup.py), so its torch is unknown"
    if record.get("format") != RECORD_FORMAT:
        return f"its build record has format {record.get('format')!r}, not {RECORD_FORMAT}"
    for key, what in (("torch", "torch"), ("torch_git", "torch build"),
                      ("cxx11_abi", "C++ ABI"), ("python", "Python"), ("platform", "platform")):
        if record.get(key) != facts.get(key):
            return f"it was built for {what} {record.get(key)}, this is {facts.get(key)}"
    if sources is not None and record.get("sources") != sources:
        return "the C++ sources changed since it was built"
    return None


def cache_key(record: dict) -> str:
    """Folder name of a JIT build: readable torch/compiler/switch parts and a hash of the rest."""
    digest = hashlib.sha256(repr(sorted(record.items())).encode()).hexdigest()[:12]
    isa = "native" if record.get("native") else "dispatch"
    parts = [f"torch{record.get('torch', '')}", str(record.get("compiler", "")).replace(" ", ""),
             isa + ("-debug" if record.get("debug") else ""), digest]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))


def cache_root(environ=None) -> str:
    environ = os.environ if environ is None else environ
    if environ.get(ENV_CACHE_DIR):
        return os.path.expanduser(environ[ENV_CACHE_DIR])
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "selkd_kernels")


def write_build_info(path: str, record: dict) -> None:
    """The generated ``selkd_kernels/_build_info.py`` (a literal dict, read by import)."""
    with open(path, "w") as fh:
        fh.write("# Generated by setup.py when it compiled selkd_kernels._C; not tracked.\n")
        fh.write(f"BUILD = {record!r}\n")
