r"""Time estimates for the Triton Sinkhorn kernels and for the torch reference on an H100/H200
class GPU, and the dispatch rule built on them (docs/gpu.md, "Dispatch").

No shape has been measured on a GPU yet: every number here is a model. The kernel side comes
from the offline compile report (``benchmarks/triton_report.py``), which compiles the kernels for
sm_90 without a GPU and counts the SASS instructions of their hot loops; :data:`CYCLES_PER_ENTRY`
condenses its result into SM cycles per padded cost entry and half-iteration (the report checks
that these constants still match the code it compiles). The reference side models PyTorch eager
execution of :func:`selkd_kernels.ops.sinkhorn.reference.solve`: cuBLAS products and elementwise
kernels, each at least one launch's worth of time.

Machine model (H100 SXM / H200, per the public specifications): 132 SMs at ~1.755 GHz; per SM
and clock 4 warp-instructions issued, 128 float32 FMA lanes, 16 MUFU lanes, 64 float64 FMA lanes;
tensor cores ~512 TF32 multiply-adds (mma.sync) or ~1024 (wgmma); 50 MB L2 at ~5.5 TB/s; HBM3
3.35 TB/s. The kernel model is a throughput bound corrected for low occupancy (a warp scheduler
with fewer than 3 warps cannot hide ~6-cycle dependent latencies), plus ~4 us per launch
(Triton's launch path from Python; a CUDA graph replays faster).
"""
from __future__ import annotations

import math

SM_COUNT = 132
CLOCK_HZ = 1.755e9
ISSUE_PER_CLK = 4.0          # warp-instructions per SM per cycle
PIPE_PER_CLK = {             # warp-instructions per SM per cycle, by pipe
    "fp32": 4.0, "fp64": 2.0, "mufu": 0.5, "int": 2.0, "shfl": 1.0, "lds": 1.0, "ldg": 1.0,
    # HMMA.1688 TF32 (1024 multiply-adds), DMMA.884 (256), wgmma in 64 x 8 x 8 units (4096)
    "mma": 0.5, "dmma": 0.55, "wgmma": 0.25, "bar": 0.5, "other": 4.0,
}
FP32_FLOPS = 67e12           # float32 FMA peak (2 flops per FMA)
TF32_FLOPS = 494.7e12        # dense TF32 tensor-core peak
FP64_TC_FLOPS = 67e12
MUFU_PER_S = SM_COUNT * 16 * CLOCK_HZ
L2_BYTES_PER_S = 5.5e12
HBM_BYTES_PER_S = 3.35e12
TRITON_LAUNCH_S = 4e-6
# PyTorch eager: the host-side cost of one op (dispatch plus launch) bounds each op from below
EAGER_OP_S = 7e-6
CUBLAS_SGEMM_FLOPS = 40e12   # what cuBLAS float32 GEMMs of these small shapes reach
CUBLAS_DGEMM_FLOPS = 45e12
ILP_OVER_LATENCY = 1.0 / 3.0

# SM cycles per padded cost entry and half-iteration of each kernel's hot loop, one program
# alone on an SM (occupancy corrected), from benchmarks/results/triton_sm90.json; the report's
# --check fails when a recompiled kernel moves by more than 25 %.
CYCLES_PER_ENTRY = {
    ("scaling-resident", "float32"): 0.0,
    ("scaling-resident", "float64"): 0.0,
    ("stabilized", "float32"): 0.0,
    ("stabilized", "float64"): 0.0,
    ("gemm", "float32"): 0.0,
    ("gemm", "float64"): 0.0,
    ("log-streamed", "float32"): 0.0,
    ("log-streamed", "float64"): 0.0,
}


def pipe_of(opcode: str) -> str:
    """The execution pipe of a SASS opcode, for the issue model."""
    if opcode in ("HGMMA",):
        return "wgmma"
    if opcode in ("HMMA",):
        return "mma"
    if opcode in ("DMMA",):
        return "dmma"
    if opcode in ("FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "FSET", "FCHK", "FRND"):
        return "fp32"
    if opcode.startswith("D") and opcode in ("DFMA", "DADD", "DMUL", "DSETP", "DMNMX"):
        return "fp64"
    if opcode == "MUFU":
        return "mufu"
    if opcode == "SHFL":
        return "shfl"
    if opcode in ("LDS", "STS", "LDSM", "STSM", "ATOMS"):
        return "lds"
    if opcode in ("LDG", "STG", "LDL", "STL", "LD", "ST", "RED", "ATOMG", "LDGSTS"):
        return "ldg"
    if opcode in ("BAR", "WARPSYNC", "BSYNC", "BSSY"):
        return "bar"
    if opcode in ("IMAD", "IADD3", "LOP3", "ISETP", "SHF", "LEA", "SEL", "IMNMX", "VIADD",
                  "PRMT", "IABS", "POPC", "FLO", "BREV", "I2F", "F2I", "F2F", "I2FP", "F2FP",
                  "IMUL", "P2R", "R2P", "VIMNMX", "MOV", "UMOV", "S2R", "CS2R", "S2UR"):
        return "int"
    return "other"


def issue_efficiency(warps_per_sm: float) -> float:
    """Fraction of the issue rate the four schedulers of an SM sustain with this many resident
    warps: each needs about 1 / ILP_OVER_LATENCY = 3 warps to hide dependent latencies."""
    return min(1.0, (warps_per_sm / 4.0) * ILP_OVER_LATENCY)


def loop_cycles(pipe_counts: dict, num_warps: int, warps_per_sm: float) -> float:
    """SM cycles of one trip of a loop whose static per-warp work by pipe is ``pipe_counts``
    (``issue``: the instruction count), for a program of ``num_warps`` warps: the issue or the
    busiest pipe's bound, divided by the occupancy efficiency."""
    bound = pipe_counts.get("issue", 0.0) * num_warps / ISSUE_PER_CLK
    for pipe, count in pipe_counts.items():
        if pipe != "issue":
            bound = max(bound, count * num_warps / PIPE_PER_CLK.get(pipe, 4.0))
    return bound / issue_efficiency(warps_per_sm)


def waves(programs: int, per_sm: int = 1) -> int:
    return math.ceil(programs / (SM_COUNT * max(1, per_sm)))


def reference_estimate_us(B: int, m: int, n: int, n_iters: int, log_domain: bool,
                          dtype_bytes: int = 4, kd: bool = False) -> float:
    """Eager PyTorch running the reference solve (tol=None): per iteration two cuBLAS products
    and two divisions in the standard domain; in the log domain per half-iteration a broadcast
    subtraction and a log-sum-exp over the (B, m, n) tensor (about six kernels, each reading or
    writing it). Each op costs at least one eager op's host time."""
    gemm_flops = CUBLAS_SGEMM_FLOPS if dtype_bytes == 4 else CUBLAS_DGEMM_FLOPS
    if not log_domain:
        gemm = max(EAGER_OP_S, 2.0 * B * m * n / gemm_flops)
        div = max(EAGER_OP_S, 3.0 * B * max(m, n) * dtype_bytes / HBM_BYTES_PER_S)
        per_iter = 2 * gemm + 2 * div
    else:
        big = B * m * n * dtype_bytes
        per_half = 6 * max(EAGER_OP_S, 2.0 * big / HBM_BYTES_PER_S)
        per_iter = 2 * per_half
    setup = (8 if kd else 4) * EAGER_OP_S
    return 1e6 * (n_iters * per_iter + setup)


def expected_speedup(problem) -> float | None:
    """Estimated ``reference time / Triton time`` for a call (``problem``: a
    :class:`selkd_kernels.ops.sinkhorn.dispatch.SinkhornProblem`), or None where there is no
    estimate (not a CUDA device, or no measurement in :data:`CYCLES_PER_ENTRY` yet)."""
    if getattr(problem, "device_type", "cuda") != "cuda":
        return None
    est = triton_estimate_us(problem)
    if est is None:
        return None
    log = _log_domain_possible(problem)
    ref = reference_estimate_us(problem.B, problem.m, problem.n, problem.n_iters, log,
                                8 if problem.dtype_name == "float64" else 4, problem.kd)
    return ref / est


def _log_domain_possible(problem) -> bool:
    # without reading the cost (a device synchronisation) "auto" may go either way; the
    # reference's standard domain is its fast case, so assume it (the conservative ratio)
    return problem.method == "log"


def _pow2(x: int, floor: int = 16) -> int:
    return max(floor, 1 << (int(x) - 1).bit_length())


def triton_estimate_us(problem) -> float | None:
    """Model time of the Triton backend's path for ``problem`` (the domain the reference would
    use being the standard one unless ``method="log"``; per-row costs take the stabilised path)."""
    BM, BN = _pow2(problem.m), _pow2(problem.n)
    dt = problem.dtype_name
    resident = BM * BN <= 128 * 128
    standard = problem.shared and problem.method != "log"
    if standard:
        kind = "scaling-resident" if resident else "gemm"
    else:
        kind = "stabilized" if resident else "log-streamed"
    cpe = CYCLES_PER_ENTRY.get((kind, dt))
    if not cpe:
        return None
    entries = 2.0 * problem.B * BM * BN * problem.n_iters
    # each SM works through its share of the rows; resident and GEMM kernels fill all SMs once
    # the batch has a few dozen rows per SM, below that fewer SMs carry the work
    rows_per_program = {"scaling-resident": 16, "gemm": 32, "stabilized": 1, "log-streamed": 1}
    programs = math.ceil(problem.B / rows_per_program[kind])
    if kind == "gemm":
        programs *= max(1, BM // 64)
    busy = min(SM_COUNT, programs)
    seconds = entries * cpe / (busy * CLOCK_HZ)
    launches = 3 if resident else 5 + 2 * problem.n_iters
    return 1e6 * (seconds + launches * TRITON_LAUNCH_S)
