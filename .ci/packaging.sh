#!/usr/bin/env bash
# Packaging checks: the package never ships without its kernels, and never pulls a CUDA torch.
#
#   .ci/packaging.sh [--full]      (run with a Python that has torch and .[test] as `python`)
#
#  1. `pip install .` into an environment without torch stops with instructions, downloading
#     no torch; next to an installed torch it installs (isolated: no kernels yet) and keeps it;
#  2. `python -m build` (isolated, the standard command) gives an sdist and, from it, a pure
#     wheel that carries the C++ sources, with a prominent warning that it has no compiled kernels;
#  3. the sdist holds every tracked file except CI plumbing (tests, benchmarks, recipes, csrc, ...);
#  4. the wheel installs next to an existing torch without replacing it; the first use compiles
#     the kernels just in time and runs the cpp backend; a second process loads them from the
#     cache without compiling;
#  5. from the unpacked sdist: the whole test suite collects (conftest, shared utilities and
#     oracles are there), and the packaging, README and CLI tests pass (kernels from step 4's
#     cache).
# --full (by hand, ~10 more minutes) also: a fresh environment with torch installed by pip rather
# than borrowed (step 4), the sdist installed with --no-build-isolation (compiled at install, the
# prebuilt library is loaded), and the sdist's whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
full=0
[[ "${1:-}" == "--full" ]] && full=1

python -c "import torch" 2>/dev/null || { echo "packaging: run with a python that has torch" >&2; exit 2; }
torch_py="$(command -v python)"
torch_version="$(python -c 'import torch; print(torch.__version__)')"
torch_site="$(python -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')"
base_py="${SELKD_BASE_PYTHON:-python3}"   # a Python without torch, for fresh environments

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export SELKD_CACHE_DIR="$work/cache" PIP_DISABLE_PIP_VERSION_CHECK=1
step() { echo; echo "== packaging: $*"; SECONDS_AT=$SECONDS; }
done_step() { echo "   ok ($((SECONDS - SECONDS_AT)) s)"; }
fail() { echo "packaging: FAILED: $*" >&2; exit 1; }

# the tracked tree, as a clean clone has it (no in-place build, no caches)
src="$work/src"
mkdir -p "$src"
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$src"

step "1. pip install . without torch stops before any download"
"$base_py" -m venv "$work/notorch"
set +e
(cd "$src" && "$work/notorch/bin/python" -m pip install . ) > "$work/notorch.log" 2>&1
rc=$?
set -e
[[ $rc -ne 0 ]] || fail "pip install . without torch succeeded"
grep -q "PyTorch is not installed in this environment" "$work/notorch.log" ||
  { cat "$work/notorch.log"; fail "no clear message"; }
! grep -qiE "(Collecting|Downloading) (torch|nvidia)" "$work/notorch.log" ||
  fail "pip went for torch"
done_step

step "1b. pip install . (isolated) next to an installed torch: installs, keeps that torch"
"$base_py" -m venv "$work/srcenv"
spy0="$work/srcenv/bin/python"
echo "$torch_site" > "$("$spy0" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_borrowed_torch.pth"
(cd "$src" && "$spy0" -m pip install . ) > "$work/srcenv.log" 2>&1 ||
  { tail -30 "$work/srcenv.log"; fail "pip install . next to torch"; }
grep -q "Requirement already satisfied: torch" "$work/srcenv.log" || fail "pip touched torch"
mkdir -p "$work/run"
(cd "$work/run" && SELKD_NO_JIT=1 "$spy0" -c "import torch, selkd_kernels as sk
p = torch.full((1, 2), 0.5); sk.sinkhorn(p, p, torch.rand(2, 2))") 2>&1 | grep -q "SELKD_NO_JIT=1" ||
  fail "the isolated install is not the kernel-less wheel that says how to get the kernels"
done_step

step "2. python -m build: sdist, and a pure wheel from it with the warning"
python -m pip install -q "build>=1"
python -m build --outdir "$work/dist" "$src" > "$work/build.log" 2>&1 ||
  { tail -40 "$work/build.log"; fail "python -m build"; }
grep -q "contains NO compiled C++ kernels" "$work/build.log" || fail "no warning in the build log"
sdist="$(ls "$work"/dist/*.tar.gz)"
wheel="$(ls "$work"/dist/*.whl)"
[[ "$wheel" == *-py3-none-any.whl ]] || fail "unexpected wheel $wheel"
python - "$wheel" <<'EOF' || fail "wheel contents"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
meta = zipfile.ZipFile(sys.argv[1]).read(next(n for n in names if n.endswith("METADATA"))).decode()
need = ["selkd_kernels/_csrc/sinkhorn_cpu.cpp", "selkd_kernels/_csrc/partial_ot_cpu.cpp",
        "selkd_kernels/py.typed", "selkd_kernels/_build.py"]
missing = [n for n in need if n not in names]
bad = [n for n in names if n.endswith((".so", "_build_info.py"))]
assert not missing and not bad, (missing, bad)
assert any(n.endswith("licenses/LICENSE") for n in names), "no LICENSE in the wheel"
for line in ("License-Expression: BSD-3-Clause", "Requires-Dist: torch>=2.4", "Version: "):
    assert line in meta, line
print("   wheel:", sys.argv[1].rsplit("/", 1)[-1], len(names), "files")
EOF
done_step

step "3. the sdist holds every tracked file (but CI plumbing)"
python - "$sdist" "$src" <<'EOF' || fail "sdist contents"
import os, subprocess, sys, tarfile
names = {n.split("/", 1)[1] for n in tarfile.open(sys.argv[1]).getnames() if "/" in n}
tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True).stdout.split()
missing = [f for f in tracked if f not in names and not f.startswith(".ci/") and f != ".gitignore"]
assert not missing, f"missing from the sdist: {missing}"
assert "selkd_kernels/_build_info.py" not in names
print("   sdist:", os.path.basename(sys.argv[1]), len(names), "entries")
EOF
done_step

step "4. the wheel next to torch $torch_version: JIT at first use, cache in the next process"
"$base_py" -m venv "$work/wheelenv"
wpy="$work/wheelenv/bin/python"
if [[ $full -eq 1 ]]; then
  "$wpy" -m pip install -q "torch==$torch_version"
else
  # borrow the torch (and numpy, tqdm, ninja) of the calling environment instead of installing
  # a second copy (~1.5 min): pip sees it as installed, exactly as a user's own torch
  wsite="$("$wpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$torch_site" > "$wsite/_borrowed_torch.pth"
fi
"$wpy" -m pip install "$wheel" > "$work/wheel-install.log" 2>&1 ||
  { tail -20 "$work/wheel-install.log"; fail "pip install wheel"; }
grep -q "Requirement already satisfied: torch" "$work/wheel-install.log" || fail "pip touched torch"
[[ "$("$wpy" -c 'import torch; print(torch.__version__)')" == "$torch_version" ]] ||
  fail "torch was replaced"
first_use='
import time, torch
t0 = time.perf_counter()
import selkd_kernels as sk
from selkd_kernels import _extension as E
assert "cpp" in sk.available_backends(), E.extension_info()
a = torch.softmax(torch.randn(3, 7, dtype=torch.float64), 1)
b = torch.softmax(torch.randn(3, 5, dtype=torch.float64), 1)
cost = torch.rand(7, 5, dtype=torch.float64)
diff = (sk.sinkhorn(a, b, cost, backend="cpp").loss - sk.sinkhorn(a, b, cost, backend="torch").loss).abs().max()
assert diff < 1e-10, diff
print(E.extension_info()["origin"], round(time.perf_counter() - t0, 1))
'
(cd "$work/run" && /usr/bin/time -f "   first use: wall %e s, CPU %U s user + %S s sys" "$wpy" -c "$first_use") \
  > "$work/first.out" 2> "$work/first.err" || { cat "$work/first.err"; fail "first use"; }
cat "$work/first.out" "$work/first.err" | sed 's/^/   /'
grep -q "^jit-build" "$work/first.out" || fail "first use did not build just in time"
grep -q "compiling the C++ CPU kernels" "$work/first.err" || fail "no build message"
(cd "$work/run" && "$wpy" -c "$first_use") > "$work/second.out" 2> "$work/second.err" ||
  { cat "$work/second.err"; fail "second process"; }
grep -q "^jit-cache" "$work/second.out" || fail "second process did not reuse the cache"
! grep -q "compiling" "$work/second.err" || fail "second process compiled again"
echo "   second process: $(cat "$work/second.out") (origin, seconds to import and solve)"
"$work/wheelenv/bin/selkd" --version | sed 's/^/   console script: /'
done_step

step "5. tests from the unpacked sdist"
tar -xzf "$sdist" -C "$work"
sdir="$(ls -d "$work"/selkd_kernels-*/)"
(cd "$sdir" && "$torch_py" -m pytest -q -p no:cacheprovider --collect-only tests > "$work/collect.log" 2>&1) ||
  { tail -20 "$work/collect.log"; fail "the sdist's tests do not collect"; }
tail -1 "$work/collect.log" | sed 's/^/   /'
(cd "$sdir" && "$torch_py" -m pytest -q -p no:cacheprovider tests/test_packaging.py \
  tests/test_readme.py tests/test_cli.py 2>&1 | tail -1 | sed 's/^/   /')
(cd "$sdir" && "$torch_py" -c "import selkd_kernels._extension as E, selkd_kernels; print(E.extension_info())") |
  grep -q "'jit-cache'" || fail "the sdist tree did not reach the cached kernels"
done_step

if [[ $full -eq 1 ]]; then
  step "full: the sdist installed with --no-build-isolation compiles at install"
  "$base_py" -m venv "$work/sdistenv"
  spy="$work/sdistenv/bin/python"
  "$spy" -m pip install -q "torch==$torch_version" "setuptools>=77" wheel ninja
  "$spy" -m pip install -q --no-build-isolation "$sdist[test]"
  (cd "$work/run" && "$spy" -c "$first_use") | grep -q "^prebuilt" || fail "not the prebuilt library"
  so="$("$spy" -c 'import selkd_kernels._extension as E, selkd_kernels; print(E.extension_info()["path"])')"
  echo "   compiled _C: $(du -k "$so" | cut -f1) KiB"
  done_step
  step "full: the sdist's whole test suite"
  (cd "$sdir" && "$spy" -m pytest -q -p no:cacheprovider tests 2>&1 | tail -3)
  done_step
fi
echo
echo "packaging: all checks passed ($SECONDS s)"
