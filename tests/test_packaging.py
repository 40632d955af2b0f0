"""Build rules and the loader's decisions (selkd_kernels/_build.py, selkd_kernels/_extension.py):
which compiled library is loaded, when the kernels are compiled just in time, with which flags,
into which cache folder. The real builds (isolated wheel, JIT at first use, cache reuse, sdist)
run in .ci/packaging.sh; these are the fast checks of the logic behind them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import selkd_kernels as sk
from selkd_kernels import _build as B
from selkd_kernels import _extension as E

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILER = B.Compiler("/usr/bin/g++", "gcc", "12.2.0")


def _record(**changes):
    rec = B.build_record(torch, COMPILER, debug=False, native=False, sources="abc",
                         openmp_runtime="gnu")
    rec.update(changes)
    return rec


# ----------------------------------------------------------------------------- compilers

@pytest.mark.parametrize("text, expected", [
    ("g++ (Debian 12.2.0-14+deb12u1) 12.2.0\nCopyright (C) 2022 Free Software Foundation",
     ("gcc", "12.2.0")),
    ("c++ (GCC) 11.4.1 20230605 (Red Hat 11.4.1-2)\nCopyright", ("gcc", "11.4.1")),
    ("Debian clang version 14.0.6\nTarget: x86_64-pc-linux-gnu", ("clang", "14.0.6")),
    ("Apple clang version 15.0.0 (clang-1500.3.9.4)\nTarget: arm64-apple-darwin23",
     ("clang", "15.0.0")),
    ("icpx: Intel(R) oneAPI DPC++/C++ Compiler", ("other", "")),
    ("", ("other", "")),
])
def test_compiler_kind_and_version_from_version_text(text, expected):
    assert B.classify_compiler(text) == expected


def test_missing_compiler_is_none():
    assert B.find_compiler({"CXX": "/nonexistent/compiler-xyz"}) is None


# ----------------------------------------------------------------------------- OpenMP

def _probe(accepts):
    calls = []

    def fn(flags, link):
        calls.append((tuple(flags), link))
        return tuple(flags) in accepts
    return fn, calls


def test_gcc_with_torch_on_gnu_openmp_gets_openmp():
    fn, _ = _probe({("-fopenmp",), ("-fopenmp-simd",)})
    omp = B.choose_openmp("gcc", "gnu", fn)
    assert omp.threads and omp.cflags == ("-fopenmp",) and omp.ldflags == ("-fopenmp",)


def test_clang_beside_gnu_runtime_is_serial_with_simd_pragmas():
    # clang would link LLVM's libomp next to torch's libgomp: two thread pools in one process
    fn, calls = _probe({("-fopenmp",), ("-fopenmp-simd",)})
    omp = B.choose_openmp("clang", "gnu", fn)
    assert not omp.threads and omp.ldflags == ()
    assert omp.cflags == ("-fopenmp-simd", "-DSELKD_OPENMP_SIMD")
    assert "gnu" in omp.note and (("-fopenmp",), True) not in calls


def test_clang_with_torch_on_llvm_openmp_gets_openmp():
    fn, _ = _probe({("-fopenmp",)})
    assert B.choose_openmp("clang", "llvm", fn).threads


def test_no_openmp_support_falls_back_to_serial():
    fn, _ = _probe(set())
    omp = B.choose_openmp("gcc", "gnu", fn)
    assert not omp.threads and omp.cflags == () and "-fopenmp failed" in omp.note
    assert not B.choose_openmp("other", "gnu", fn).threads


def test_openmp_runtime_names():
    assert B.openmp_runtime_of(["/x/libgomp.so.1", "/x/libc.so.6"]) == "gnu"
    assert B.openmp_runtime_of(["libgomp-a34b3233.so.1"]) == "gnu"
    assert B.openmp_runtime_of(["/opt/lib/libomp.dylib"]) == "llvm"
    assert B.openmp_runtime_of(["libiomp5.so"]) == "intel"
    assert B.openmp_runtime_of(["libtorch.so"]) is None


def test_this_torch_runs_on_a_detected_runtime():
    # the Linux CPU wheel of torch bundles libgomp, loaded by now
    if not sys.platform.startswith("linux"):
        pytest.skip("the loaded-library scan is Linux-only")
    assert B.torch_openmp_runtime(torch) in ("gnu", "llvm", "intel")


def test_probe_really_compiles():
    compiler = B.find_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    assert B.probe(compiler, ("-fopenmp-simd",), link=False)
    assert not B.probe(compiler, ("--no-such-flag-xyz",), link=False)


# ----------------------------------------------------------------------------- flags

def test_release_flags_have_no_debug_information_and_strip():
    f = B.compile_flags(debug=False, native=False, openmp=B.OpenMP(("-fopenmp",), ("-fopenmp",)),
                        platform="linux")
    assert "-O3" in f.cflags and f.cflags.index("-g0") >= 0 and "-g" not in f.cflags
    assert "-s" in f.ldflags and "-fopenmp" in f.cflags and "-fopenmp" in f.ldflags
    assert not any(c.startswith("-std=") for c in f.cflags)  # torch adds the one it needs
    assert "-march=native" not in f.cflags


def test_debug_flags_keep_symbols_and_assertions():
    f = B.compile_flags(debug=True, native=True, openmp=B.OpenMP(), platform="linux")
    assert {"-O0", "-g", "-UNDEBUG", "-march=native"} <= set(f.cflags)
    assert "-O3" not in f.cflags and "-s" not in f.ldflags


def test_no_strip_flag_off_linux():
    f = B.compile_flags(debug=False, native=False, openmp=B.OpenMP(), platform="darwin")
    assert "-s" not in f.ldflags


def test_env_flags():
    assert B.env_flag("X", {"X": "1"}) and B.env_flag("X", {"X": " Yes "})
    assert not B.env_flag("X", {"X": "0"}) and not B.env_flag("X", {})


# ----------------------------------------------------------------------------- prebuilt check

def test_prebuilt_record_for_this_torch_is_accepted():
    assert B.prebuilt_mismatch(_record(), B.runtime_facts(torch), "abc") is None
    assert B.prebuilt_mismatch(_record(), B.runtime_facts(torch), None) is None


@pytest.mark.parametrize("changes, words", [
    ({"torch": "2.4.0"}, "torch 2.4.0"),
    ({"torch_git": "deadbeef"}, "torch build deadbeef"),
    ({"cxx11_abi": not B.runtime_facts(torch)["cxx11_abi"]}, "C++ ABI"),
    ({"python": "cpython-39"}, "Python cpython-39"),
    ({"format": 0}, "format"),
])
def test_prebuilt_for_another_torch_or_python_is_refused(changes, words):
    why = B.prebuilt_mismatch(_record(**changes), B.runtime_facts(torch), "abc")
    assert why is not None and words in why


def test_prebuilt_without_record_or_with_other_sources_is_refused():
    assert "no build record" in B.prebuilt_mismatch(None, B.runtime_facts(torch), "abc")
    assert "sources changed" in B.prebuilt_mismatch(_record(), B.runtime_facts(torch), "xyz")


def test_build_info_is_parsed_not_executed(tmp_path):
    (tmp_path / "_build_info.py").write_text("import os\nBUILD = {'torch': '2.13.0', 'x': [1]}\n")
    assert E.read_build_info(str(tmp_path)) == {"torch": "2.13.0", "x": [1]}
    (tmp_path / "_build_info.py").write_text("BUILD = __import__('os').getcwd()\n")
    assert E.read_build_info(str(tmp_path)) is None
    assert E.read_build_info(str(tmp_path / "missing")) is None


# ----------------------------------------------------------------------------- JIT cache

def test_cache_key_changes_with_everything_the_library_depends_on():
    base = B.cache_key(_record())
    assert base == B.cache_key(_record())
    assert base.startswith(f"torch{torch.__version__}".replace("+", "_"))
    assert "gcc12.2.0" in base and "dispatch" in base
    for change in ({"torch": "2.5.0"}, {"compiler": "clang 14.0.6"}, {"native": True},
                   {"debug": True}, {"sources": "def"}, {"python": "cpython-312"},
                   {"openmp_runtime": None}):
        assert B.cache_key(_record(**change)) != base, change
    assert "native" in B.cache_key(_record(native=True))
    assert "-debug" in B.cache_key(_record(debug=True))


def test_cache_root_follows_the_environment(tmp_path):
    assert B.cache_root({"SELKD_CACHE_DIR": str(tmp_path)}) == str(tmp_path)
    assert B.cache_root({"XDG_CACHE_HOME": "/c"}) == os.path.join("/c", "selkd_kernels")
    assert B.cache_root({}).endswith(os.path.join(".cache", "selkd_kernels"))


def test_sources_hash_depends_on_content_not_order(tmp_path):
    a, b = tmp_path / "a.cpp", tmp_path / "b.cpp"
    a.write_text("int a;")
    b.write_text("int b;")
    h = B.sources_hash([str(a), str(b)])
    assert h == B.sources_hash([str(b), str(a)])
    b.write_text("int b2;")
    assert B.sources_hash([str(a), str(b)]) != h


def test_installed_sources_win_over_a_source_tree(tmp_path):
    pkg = tmp_path / "selkd_kernels"
    (pkg / "_csrc").mkdir(parents=True)
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "x.cpp").write_text("")
    assert B.source_files(str(pkg)) == [str(tmp_path / "csrc" / "x.cpp")]
    (pkg / "_csrc" / "y.cpp").write_text("")
    assert B.source_files(str(pkg)) == [str(pkg / "_csrc" / "y.cpp")]


@pytest.mark.parametrize("environ, sources, compiler, ninja, words", [
    ({"SELKD_NO_JIT": "1"}, ["x.cpp"], COMPILER, True, "SELKD_NO_JIT=1"),
    ({}, [], COMPILER, True, "no C++ sources"),
    ({"CXX": "icpx"}, ["x.cpp"], None, True, "no C++ compiler was found"),
    ({}, ["x.cpp"], COMPILER, False, "ninja"),
])
def test_jit_blockers(environ, sources, compiler, ninja, words):
    assert words in E.jit_blocker(environ, sources, compiler, ninja)


def test_jit_allowed_when_everything_is_there():
    assert E.jit_blocker({}, ["x.cpp"], COMPILER, True) is None


def test_refusal_says_why_and_how_to_get_the_fast_path(tmp_path):
    # a package folder without _C, with JIT turned off: one ImportError, raised again unchanged
    pkg = tmp_path / "selkd_kernels"
    shutil.copytree(os.path.join(ROOT, "csrc"), pkg / "_csrc")
    loader = E.Loader(package_dir=str(pkg), environ={"SELKD_NO_JIT": "1"})
    with pytest.raises(ImportError) as first:
        loader.load()
    msg = str(first.value)
    assert "_C is not built" in msg and "SELKD_NO_JIT=1" in msg
    assert "C++ compiler" in msg and "--no-build-isolation" in msg
    with pytest.raises(ImportError) as again:
        loader.load()
    assert str(again.value) == msg


def test_cache_hit_loads_without_compiling(tmp_path):
    """A cache folder whose record matches is loaded directly (a fresh process, with the
    prebuilt library of this tree standing in for a JIT build)."""
    prebuilt = E.find_prebuilt(E.PACKAGE_DIR)
    if prebuilt is None or B.find_compiler() is None:
        pytest.skip("needs the built extension and a compiler")
    script = f"""
import json, os, shutil, sys, torch
from selkd_kernels import _build as B, _extension as E
pkg = {str(tmp_path / 'pkg')!r}
shutil.copytree({os.path.join(ROOT, 'csrc')!r}, os.path.join(pkg, '_csrc'))
env = {{'SELKD_CACHE_DIR': {str(tmp_path / 'cache')!r}}}
rec = B.record_for(torch, B.find_compiler(env), B.sources_hash(B.source_files(pkg)), env)
folder = os.path.join(B.cache_root(env), 'jit', B.cache_key(rec))
os.makedirs(folder)
shutil.copy({prebuilt!r}, os.path.join(folder, E.JIT_NAME + '.so'))
E._write_record(folder, dict(rec, cflags=[], ldflags=[]))
loader = E.Loader(package_dir=pkg, environ=env)
print(loader.load(), hasattr(torch.ops.selkd, 'sinkhorn_solve'))
"""
    # the package itself must not load its own _C first: import only the two modules
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _isolated_import(script)], capture_output=True,
                         text=True, timeout=300, env=env, cwd=str(tmp_path), check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["jit-cache", "True"]
    assert "compiling" not in out.stderr


def _isolated_import(script: str) -> str:
    # load selkd_kernels._build and ._extension without running the package __init__ (which
    # would load this tree's _C through the backends)
    return f"""
import importlib.util, os, sys, types
root = {ROOT!r}
pkg = types.ModuleType('selkd_kernels'); pkg.__path__ = [os.path.join(root, 'selkd_kernels')]
sys.modules['selkd_kernels'] = pkg
for name in ('_build', '_extension'):
    spec = importlib.util.spec_from_file_location('selkd_kernels.' + name,
                                                  os.path.join(root, 'selkd_kernels', name + '.py'))
    mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod
    spec.loader.exec_module(mod); setattr(pkg, name, mod)
""" + script


# ----------------------------------------------------------------------------- metadata

def _pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


def test_metadata_is_modern_and_complete():
    project = _pyproject()["project"]
    assert project["license"] == "BSD-3-Clause" and project["license-files"] == ["LICENSE"]
    assert os.path.isfile(os.path.join(ROOT, "LICENSE"))
    with open(os.path.join(ROOT, "LICENSE")) as fh:
        assert "BSD 3-Clause" in fh.read()
    assert project["classifiers"] and project["keywords"]
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # PEP 639
    assert project["dynamic"] == ["version"] and "version" not in project
    assert os.path.isfile(os.path.join(ROOT, "selkd_kernels", "py.typed"))


def test_one_version_source():
    from selkd_kernels._version import __version__
    assert sk.__version__ == __version__
    dynamic = _pyproject()["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "selkd_kernels._version.__version__"}


def test_torch_floor_and_no_triton_in_test_extra():
    project = _pyproject()["project"]
    assert "torch>=2.4" in project["dependencies"]
    assert not any("triton" in r for r in project["optional-dependencies"]["test"])
    assert any(r.startswith("triton") for r in project["optional-dependencies"]["triton"])
    # the floor is what the code needs: register_fake (2.4) and is_compiling (2.3) exist here
    assert hasattr(torch.library, "register_fake") and hasattr(torch.compiler, "is_compiling")


def test_the_loaded_extension_says_where_it_came_from():
    if "cpp" not in sk.available_backends():
        pytest.skip("no C++ backend here")
    info = E.extension_info()
    assert info["origin"] in ("prebuilt", "jit-cache", "jit-build") and info["error"] is None
    assert os.path.isfile(info["path"])


def test_a_second_loader_of_an_already_imported_extension_says_where_it_is():
    # the prebuilt _C is already in sys.modules (this process loaded it): a fresh loader must
    # still report its origin and path, not None
    if "cpp" not in sk.available_backends() or E.extension_info()["origin"] != "prebuilt":
        pytest.skip("the C++ backend here is not the prebuilt _C")
    loader = E.Loader()
    assert loader.load() == "prebuilt"
    assert loader.path == E.extension_info()["path"]
