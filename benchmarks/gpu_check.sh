#!/usr/bin/env bash
# One-command GPU check (docs/gpu.md): on a machine with one CUDA GPU, from the repository root,
#
#   bash benchmarks/gpu_check.sh [OUTDIR]          # OUTDIR: else $OUT, else a new temp folder
#   bash benchmarks/gpu_check.sh --dry-run [OUTDIR] # CPU only: Triton interpreter, tiny shapes
#
# 1. installs the package into a throwaway folder (pip --target) that is put on PYTHONPATH, so
#    the Python that runs this script (and its CUDA torch and Triton) is used as it is, never
#    changed: no C++ build (SELKD_NO_EXTENSIONS=1), no dependency resolution, no network
#    (--no-deps --no-index); torch's version is checked before and after;
# 2. runs the GPU tests (pytest -m gpu) and the Triton reference-agreement tests on CUDA tensors;
# 3. times `selkd bench` on cifar / large-batch / many-classes / sharp (on a GPU one phase per
#    workload, in the dry run one for all):
#    the Triton backend against the reference family (eager, torch.compile'd, and for the KD
#    forward the unrolled autograd reference; `--providers 'reference:*'` selects the family), solve
#    and KD forward;
# 4. writes everything to OUTDIR: env.txt, pytest_*.log/xml, bench_*/results.json, summary.md.
#
# Every phase has its own time limit (seconds below); a phase that runs out is reported as such
# and the next one runs. The limits add up to under 8 minutes on an H100/H200; --dry-run under
# 2 minutes on a CPU.
set -uo pipefail

DRY=0
declare -A T_BENCH
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUTDIR="${1:-${OUT:-$(mktemp -d -t selkd_gpu_check.XXXXXX)}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-python}"
SUMMARY="$OUTDIR/summary.md"
START=$(date +%s)

if (( DRY )); then
  T_INSTALL=60; T_GPU_TESTS=40; T_AGREE=60
  # one bench phase for all workloads: the interpreter's times mean nothing, and each phase
  # pays the imports and the quick mode's batch sweep again
  T_BENCH=(["cifar large-batch many-classes sharp"]=90)
  export TRITON_INTERPRET=1
  BENCH_FLAGS=(--quick --device cpu --threads 1)
  AGREE_SELECT=(-k "shapes_float32 and (scaling or stabilized) and 3-7-13")
else
  T_INSTALL=45; T_GPU_TESTS=100; T_AGREE=100
  T_BENCH=([cifar]=50 [large-batch]=50 [many-classes]=60 [sharp]=50)
  BENCH_FLAGS=(--device cuda --repeats 10 --warmup 2 --budget 4 --max-call-s 20 --no-memory)
  AGREE_SELECT=(-m "not slow and not gpu")
fi

phase_status=()
note() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }
run_phase() {  # name limit command...
  local name="$1" limit="$2"; shift 2
  local t0=$(date +%s)
  note "phase $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  case $rc in
    0) phase_status+=("| $name | ok | ${dt}s |");;
    124|137) phase_status+=("| $name | TIMED OUT after ${limit}s | ${dt}s |");;
    *) phase_status+=("| $name | exit $rc | ${dt}s |");;
  esac
  return $rc
}

# ------------------------------------------------------------------------------- 1. install
SITE="$OUTDIR/site"
install() {
  rm -rf "$SITE"
  local before after
  before="$("$PY" -c 'import torch; print(torch.__version__)')" || return 1
  SELKD_NO_EXTENSIONS=1 "$PY" -m pip install --no-deps --no-build-isolation --no-index -q \
    --target "$SITE" "$REPO" || return 1
  after="$("$PY" -c 'import torch; print(torch.__version__)')"
  [[ "$before" == "$after" ]] || { echo "torch changed: $before -> $after"; return 1; }
  (cd "$OUTDIR" && PYTHONPATH="$SITE" "$PY" -c \
    'import selkd_kernels; print("installed", selkd_kernels.__file__)')
}
run_phase install "$T_INSTALL" bash -c "$(declare -f install); SITE='$SITE' PY='$PY' \
  REPO='$REPO' OUTDIR='$OUTDIR' install" > "$OUTDIR/install.log" 2>&1

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "mode: $( (( DRY )) && echo 'dry run (CPU, Triton interpreter)' || echo GPU)"
  git -C "$REPO" rev-parse HEAD 2>/dev/null | sed 's/^/commit: /'
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available()); print("triton", triton.__version__)
if torch.cuda.is_available(): print("gpu", torch.cuda.get_device_name(0))' 2>&1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm \
    --format=csv,noheader 2>&1
} > "$OUTDIR/env.txt"

if (( ! DRY )) && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  note "no CUDA GPU visible: use --dry-run on a CPU-only machine"
  exit 2
fi

# ------------------------------------------------------------------------------- 2. tests
cd "$REPO" || exit 1
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts="")
run_phase "pytest -m gpu" "$T_GPU_TESTS" "${PYTEST[@]}" -m gpu tests \
  --junitxml="$OUTDIR/pytest_gpu.xml" > "$OUTDIR/pytest_gpu.log" 2>&1
run_phase "agreement tests (Triton vs reference)" "$T_AGREE" "${PYTEST[@]}" "${AGREE_SELECT[@]}" \
  tests/ops/sinkhorn/test_triton.py tests/ops/sinkhorn/test_triton_dispatch.py \
  --junitxml="$OUTDIR/pytest_agreement.xml" > "$OUTDIR/pytest_agreement.log" 2>&1

# ------------------------------------------------------------------------------- 3. benchmarks
cd "$OUTDIR" || exit 1  # the installed package, not the source tree
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# on a GPU one phase per workload, so that a slow torch.compile costs one workload's results
for group in cifar large-batch many-classes sharp "cifar large-batch many-classes sharp"; do
  [[ -n "${T_BENCH[$group]:-}" ]] || continue
  tag="${group// /+}"
  # shellcheck disable=SC2086  # the group is a list of workload names
  run_phase "bench $tag: triton vs reference (eager, compiled)" "${T_BENCH[$group]}" "$PY" -m \
    selkd_kernels.cli bench --workloads $group --ops sinkhorn kd-forward \
    --providers selkd:triton 'reference:*' "${BENCH_FLAGS[@]}" --no-progress \
    --out "$OUTDIR/bench_$tag" > "$OUTDIR/bench_$tag.log" 2>&1
done

# ------------------------------------------------------------------------------- 4. summary
{
  echo "# GPU check ($( (( DRY )) && echo 'dry run: CPU, interpreter, tiny shapes, no timing claims' || echo GPU))"
  echo
  sed 's/^/    /' "$OUTDIR/env.txt"
  echo
  echo "| phase | result | wall |"
  echo "|---|---|---|"
  printf '%s\n' "${phase_status[@]}"
  echo
  for log in pytest_gpu pytest_agreement; do
    [[ -f "$OUTDIR/$log.log" ]] && echo "$log: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUTDIR/$log.log" | tail -1)"
  done
  echo
  "$PY" - "$OUTDIR" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for f in sorted(out.glob("bench_*/results.json")):
    rows += json.load(open(f))["results"]
if not rows:
    print("no benchmark results (see bench_*.log)")
    sys.exit(0)
t = {}
for r in rows:
    if r.get("status") == "ok" and r.get("time_ms_median"):
        t[(r["op"], r["workload"], r["provider"])] = r["time_ms_median"]
    elif r.get("provider") == "selkd:triton" and r.get("status") == "ok":
        t.setdefault((r["op"], r["workload"], r["provider"]), None)
agree = {(r["op"], r["workload"]): r.get("agrees_with_ref") for r in rows
         if r.get("provider") == "selkd:triton"}
print("| op | workload | triton ms | eager ref ms | x eager | compiled ref ms | x compiled | agrees |")
print("|---|---|---|---|---|---|---|---|")
for (op, wl) in sorted({(k[0], k[1]) for k in t}):
    tri, eag, com = (t.get((op, wl, p)) for p in ("selkd:triton", "reference",
                                                  "reference:compiled"))
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    ratio = lambda a, b: "-" if (a is None or b is None) else f"{b / a:.1f}"
    print(f"| {op} | {wl} | {fmt(tri)} | {fmt(eag)} | {ratio(tri, eag)} | {fmt(com)} | "
          f"{ratio(tri, com)} | {agree.get((op, wl))} |")
EOF
  echo
  echo "total: $(( $(date +%s) - START ))s"
} > "$SUMMARY" 2>&1
cat "$SUMMARY"
note "results in $OUTDIR"
failed=0
for s in "${phase_status[@]}"; do [[ "$s" == *"| ok |"* ]] || failed=1; done
exit $failed
