r"""Time estimates for the Triton Sinkhorn kernels and for the torch reference on an H100/H200
class GPU, and the dispatch rule built on them (docs/gpu.md, "Dispatch").

No shape has been measured on a GPU yet: every number here is a model. The kernel side comes
from the offline compile report (``benchmarks/triton_report.py``), which compiles the kernels for
sm_90 without a GPU and counts the SASS instructions of their hot loops; :data:`COSTS` records
that work per padded cost entry and pipe (the report's ``--check`` fails when the compiled
kernels no longer match it). The reference side models PyTorch eager execution of
:func:`selkd_kernels.ops.sinkhorn.reference.solve`: cuBLAS products and elementwise kernels, each
costing at least one eager op's host time.

Machine model (H100 SXM / H200, public specifications): 132 SMs at ~1.755 GHz; per SM and clock
4 warp-instructions issued, 128 float32 FMA lanes, 64 float64 FMA lanes, 16 MUFU lanes; tensor
cores ~512 TF32 multiply-adds per clock through mma.sync (HMMA) and ~1024 through wgmma (HGMMA);
L2 ~5.5 TB/s, HBM3 3.35 TB/s. A kernel's time is a throughput bound (issue or busiest pipe, or
L2 traffic) divided by an occupancy factor (a scheduler needs ~3 resident warps to hide ~6-cycle
dependent latencies), and a launch costs at least ~4 us of host time (Triton's launch path from
Python; the host queues launches while the GPU runs earlier ones, and a CUDA graph replays
faster). A kernel that keeps re-reading ``K`` (the resident scaling kernel, 128 KB for 128 x 128
classes) is assumed to find it in the SM's L1.
"""
from __future__ import annotations

import functools
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
MUFU_PER_S = SM_COUNT * 16 * CLOCK_HZ
L2_BYTES_PER_S = 5.5e12
HBM_BYTES_PER_S = 3.35e12
TRITON_LAUNCH_S = 4e-6
EAGER_OP_S = 7e-6            # host time of one PyTorch eager op (dispatch and launch)
CUBLAS_SGEMM_FLOPS = 40e12   # what cuBLAS float32 GEMMs of these small shapes reach
CUBLAS_DGEMM_FLOPS = 45e12
ILP_OVER_LATENCY = 1.0 / 3.0

# cost entries that one trip of each kernel's hot loop covers, from its compile-time constants
ENTRIES_PER_TRIP = {
    "scaling-resident": lambda c: 2 * c["BB"] * c["BM"] * c["BN"],
    "gemm-alpha": lambda c: c["BB"] * c["BT"] * c["BK"],
    "gemm-beta": lambda c: c["BB"] * c["BT"] * c["BK"],
    "gemm-check": lambda c: c["BB"] * c["BT"] * c["BK"],
    "gemm-finish-product": lambda c: c["BB"] * c["BT"] * c["BK"],
    "stabilized": lambda c: 2 * c["BM"] * c["BN"],
    "log-streamed": lambda c: c["BM"] * c["BN"],
}
PER_ROW_KERNELS = ("stabilized", "log-streamed")

# Per (kernel, compute dtype), from benchmarks/results/triton_sm90.json, i.e. from the kernels
# compiled for the canonical workloads (regenerate with ``python benchmarks/triton_report.py
# --costs``): ``trip`` is the work of one trip of the hot loop per padded cost entry, for the
# whole program, in warp-instructions by pipe (:func:`pipe_of`; ``issue`` is their total);
# ``rest`` the work outside it, once per launch (per row for the per-row kernels); registers per
# thread; shared bytes; L2 bytes per entry of a trip.
COSTS = {
    ('gemm-alpha', 'float32'): dict(
        registers=111, shared=16384, l2_per_entry=0.1875,
        rest={'bar': 28, 'fp32': 1104, 'fp64': 100, 'int': 1612, 'issue': 3628, 'ldg': 144,
            'lds': 108, 'mufu': 136, 'other': 392, 'shfl': 4},
        trip={'bar': 0.000153, 'fp32': 0.000488, 'int': 0.003265, 'issue': 0.005524,
            'ldg': 0.000366, 'lds': 0.000488, 'other': 0.000397, 'wgmma': 0.000366}),
    ('gemm-alpha', 'float64'): dict(
        registers=66, shared=10240, l2_per_entry=2.5,
        rest={'bar': 104, 'fp32': 136, 'fp64': 428, 'int': 1284, 'issue': 2516, 'ldg': 96,
            'lds': 52, 'mufu': 40, 'other': 376},
        trip={'bar': 0.001953, 'dmma': 0.01562, 'int': 0.008301, 'issue': 0.06323,
            'ldg': 0.004883, 'lds': 0.02051, 'other': 0.01196}),
    ('gemm-beta', 'float32'): dict(
        registers=112, shared=16384, l2_per_entry=0.1875,
        rest={'bar': 20, 'fp32': 1104, 'fp64': 100, 'int': 2012, 'issue': 4040, 'ldg': 152,
            'lds': 108, 'mufu': 136, 'other': 404, 'shfl': 4},
        trip={'bar': 0.000153, 'fp32': 0.000488, 'int': 0.002563, 'issue': 0.005554,
            'ldg': 0.000366, 'lds': 0.001221, 'other': 0.000397, 'wgmma': 0.000366}),
    ('gemm-beta', 'float64'): dict(
        registers=72, shared=10240, l2_per_entry=2.5,
        rest={'bar': 104, 'fp32': 136, 'fp64': 428, 'int': 1396, 'issue': 2664, 'ldg': 104,
            'lds': 52, 'mufu': 40, 'other': 404},
        trip={'bar': 0.001953, 'dmma': 0.01562, 'int': 0.001953, 'issue': 0.05615,
            'ldg': 0.004883, 'lds': 0.02051, 'other': 0.01123}),
    ('gemm-finish-product', 'float32'): dict(
        registers=111, shared=16384, l2_per_entry=0.1875,
        rest={'bar': 16, 'fp32': 172, 'fp64': 100, 'int': 900, 'issue': 1620, 'ldg': 72,
            'lds': 128, 'mufu': 8, 'other': 224},
        trip={'bar': 0.000153, 'fp32': 0.000488, 'int': 0.003448, 'issue': 0.005707,
            'ldg': 0.000366, 'lds': 0.000488, 'other': 0.000397, 'wgmma': 0.000366}),
    ('gemm-finish-product', 'float64'): dict(
        registers=60, shared=10240, l2_per_entry=2.5,
        rest={'bar': 32, 'fp32': 40, 'fp64': 136, 'int': 520, 'issue': 1024, 'ldg': 40,
            'lds': 64, 'mufu': 8, 'other': 184},
        trip={'bar': 0.001953, 'dmma': 0.01562, 'int': 0.003418, 'issue': 0.05859,
            'ldg': 0.004883, 'lds': 0.02051, 'other': 0.01221}),
    ('log-streamed', 'float32'): dict(
        registers=254, shared=128, l2_per_entry=4.125,
        rest={'bar': 144, 'fp32': 8152, 'fp64': 100, 'int': 12496, 'issue': 24232, 'ldg': 836,
            'lds': 264, 'mufu': 400, 'other': 1764, 'shfl': 76},
        trip={'bar': 0.01562, 'fp32': 0.6562, 'int': 0.2202, 'issue': 1.46, 'ldg': 0.03223,
            'lds': 0.03125, 'mufu': 0.0625, 'other': 0.004395, 'shfl': 0.4375}),
    ('log-streamed', 'float64'): dict(
        registers=255, shared=256, l2_per_entry=0.5,
        rest={'bar': 2728, 'fp32': 9744, 'fp64': 33304, 'int': 50092, 'issue': 111864,
            'ldg': 4292, 'lds': 904, 'mufu': 272, 'other': 3208, 'shfl': 7320},
        trip={'bar': 0.003906, 'fp32': 0.001953, 'fp64': 0.0332, 'int': 0.07031, 'issue': 0.127,
            'ldg': 0.003906, 'mufu': 0.000977, 'other': 0.01269}),
    ('scaling-resident', 'float32'): dict(
        registers=159, shared=16384, l2_per_entry=0.125,
        rest={'bar': 152, 'fp32': 3472, 'fp64': 100, 'int': 4160, 'issue': 9316, 'ldg': 228,
            'lds': 272, 'mma': 192, 'mufu': 8, 'other': 660, 'shfl': 72},
        trip={'bar': 0.000412, 'fp32': 0.00293, 'int': 0.006836, 'issue': 0.01876,
            'ldg': 0.001221, 'lds': 0.003845, 'mma': 0.00293, 'mufu': 0.000244,
            'other': 0.000343}),
    ('scaling-resident', 'float64'): dict(
        registers=250, shared=18432, l2_per_entry=0.25,
        rest={'bar': 400, 'dmma': 256, 'fp32': 392, 'fp64': 4652, 'int': 11488, 'issue': 19848,
            'ldg': 496, 'lds': 560, 'mufu': 136, 'other': 1212, 'shfl': 256},
        trip={'bar': 0.000809, 'dmma': 0.003906, 'fp32': 0.000732, 'fp64': 0.002197,
            'int': 0.0111, 'issue': 0.02879, 'ldg': 0.001465, 'lds': 0.004272, 'mufu': 0.000244,
            'other': 0.004066}),
    ('stabilized', 'float32'): dict(
        registers=246, shared=4096, l2_per_entry=0.0,
        rest={'bar': 272, 'fp32': 36552, 'fp64': 200, 'int': 8816, 'issue': 54944, 'ldg': 496,
            'lds': 344, 'mufu': 3000, 'other': 1568, 'shfl': 3696},
        trip={'bar': 0.001953, 'fp32': 0.1543, 'int': 0.03906, 'issue': 0.2334, 'lds': 0.001953,
            'mufu': 0.005859, 'other': 0.007812, 'shfl': 0.02246}),
    ('stabilized', 'float64'): dict(
        registers=128, shared=8192, l2_per_entry=0.0,
        rest={'bar': 9952, 'fp32': 29088, 'fp64': 116784, 'int': 134656, 'issue': 337792,
            'ldg': 16032, 'lds': 2208, 'mufu': 1952, 'other': 10512, 'shfl': 16608},
        trip={'bar': 0.02783, 'fp32': 0.06445, 'fp64': 0.2227, 'int': 0.1748, 'issue': 0.6914,
            'ldg': 0.05469, 'lds': 0.01367, 'mufu': 0.009766, 'other': 0.02295, 'shfl': 0.1006}),
}


def pipe_of(opcode: str) -> str:
    """The execution pipe of a SASS opcode, for the issue model."""
    if opcode == "HGMMA":
        return "wgmma"
    if opcode == "HMMA":
        return "mma"
    if opcode == "DMMA":
        return "dmma"
    if opcode in ("FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "FSET", "FCHK", "FRND"):
        return "fp32"
    if opcode in ("DFMA", "DADD", "DMUL", "DSETP", "DMNMX"):
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


def pipe_cycles(work: dict) -> float:
    """SM cycles of ``work`` (warp-instructions of a whole program by pipe, ``issue`` their
    total) at full issue rate: the issue bound or the busiest pipe's, whichever is larger."""
    bound = work.get("issue", 0.0) / ISSUE_PER_CLK
    for pipe, count in work.items():
        if pipe != "issue":
            bound = max(bound, count / PIPE_PER_CLK.get(pipe, 4.0))
    return bound


def programs_per_sm(registers, shared, num_warps) -> int:
    """Programs of a kernel that fit on one SM at once (registers, shared memory, warps)."""
    by_regs = 65536 // max(1, (registers or 255) * 32 * num_warps)
    by_smem = (228 * 1024) // shared if shared else 32
    return max(1, min(by_regs, by_smem, 64 // num_warps, 32))


def trips_per_program(name: str, consts: dict, n_iters: int, m: int, n: int, rows: int) -> float:
    """Trips of a kernel's hot loop per program and launch (0 for kernels without one)."""
    if name == "scaling-resident":
        return n_iters
    if name in ("gemm-alpha", "gemm-beta"):
        return consts["LDX"] / consts["BK"]
    if name in ("gemm-check", "gemm-finish-product"):
        return consts["LDN"] / consts["BK"]
    if name == "stabilized":
        return n_iters * rows
    if name == "log-streamed":
        tiles = math.ceil(m / consts["BM"]) * math.ceil(n / consts["BN"])
        return (2 * n_iters + 1) * tiles * rows
    return 0.0


def launches_of(step, n_iters: int, n_checks: int) -> int:
    return {"once": 1, "per-iteration": n_iters, "per-check": n_checks}[step.repeat]


def step_estimate_us(step, cost: dict | None, *, n_iters: int, n_checks: int, m: int, n: int,
                     rows: int, active: bool = True) -> float:
    """Model time of all launches of one :class:`~.triton.Step` in one call: each launch costs
    the longer of its GPU time (the busiest SM's compute, or the L2 traffic) and the host's
    launch time. An inactive step (the domain ``method="auto"`` did not pick) costs its
    launches only."""
    launches = launches_of(step, n_iters, n_checks)
    if not launches:
        return 0.0
    if not active or cost is None:
        return 1e6 * launches * TRITON_LAUNCH_S
    cfg = step.config
    consts, nw = cfg.consts, cfg.num_warps
    programs = math.prod(step.grid)
    per_sm = math.ceil(programs / SM_COUNT)
    concurrent = min(per_sm, programs_per_sm(cost["registers"], cost["shared"], nw))
    eff = issue_efficiency(concurrent * nw)
    entries = ENTRIES_PER_TRIP[cfg.name](consts) if cfg.name in ENTRIES_PER_TRIP else 0
    trips = trips_per_program(cfg.name, consts, n_iters, m, n, rows)
    trip = {k: v * entries for k, v in cost.get("trip", {}).items()}
    rest_times = rows if cfg.name in PER_ROW_KERNELS else 1
    cycles = (trips * pipe_cycles(trip) + rest_times * pipe_cycles(cost["rest"])) / eff
    compute_s = per_sm * cycles / CLOCK_HZ
    memory_s = programs * trips * entries * cost.get("l2_per_entry", 0.0) / L2_BYTES_PER_S
    return 1e6 * launches * max(compute_s, memory_s, TRITON_LAUNCH_S)


def reference_estimate_us(B: int, m: int, n: int, n_iters: int, log_domain: bool,
                          dtype_bytes: int = 4, kd: bool = False, shared: bool = True) -> float:
    """Eager PyTorch running the reference solve (tol=None): per iteration two cuBLAS products
    (batched matrix-vector products reading the (B, m, n) kernel for a per-row cost) and two
    divisions in the standard domain; in the log domain per half-iteration a broadcast
    subtraction and a log-sum-exp over the (B, m, n) tensor (about six kernels, each reading or
    writing it). Each op costs at least one eager op's host time."""
    gemm_flops = CUBLAS_SGEMM_FLOPS if dtype_bytes == 4 else CUBLAS_DGEMM_FLOPS
    if not log_domain:
        if shared:
            gemm = max(EAGER_OP_S, 2.0 * B * m * n / gemm_flops)
        else:
            gemm = max(EAGER_OP_S, B * m * n * dtype_bytes / HBM_BYTES_PER_S)
        div = max(EAGER_OP_S, 3.0 * B * max(m, n) * dtype_bytes / HBM_BYTES_PER_S)
        per_iter = 2 * gemm + 2 * div
    else:
        big = B * m * n * dtype_bytes
        per_half = 6 * max(EAGER_OP_S, 2.0 * big / HBM_BYTES_PER_S)
        per_iter = 2 * per_half
    setup = (8 if kd else 4) * EAGER_OP_S
    return 1e6 * (n_iters * per_iter + setup)


def triton_estimate_us(problem, costs: dict | None = None) -> float | None:
    """Model time of the Triton backend's launches for a call (``problem``: a
    :class:`selkd_kernels.ops.sinkhorn.dispatch.SinkhornProblem`). The domain taken is the
    standard one unless ``method="log"`` or the cost is per row; the other domain's kernels,
    launched for ``method="auto"``, cost their launches. None if a working kernel has no entry
    in ``costs`` (default :data:`COSTS`)."""
    import torch

    from . import triton as T
    costs = COSTS if costs is None else costs
    dtype = torch.float64 if problem.dtype_name == "float64" else torch.float32
    p = T.Problem(B=problem.B, m=problem.m, n=problem.n, dtype=dtype, shared=problem.shared,
                  kd=problem.kd, teacher_grad=problem.kd, has_tol=False, method=problem.method,
                  sm_count=SM_COUNT)
    domain = "log" if (problem.method == "log" or not problem.shared) else "standard"
    total = 0.0
    for step in T.plan(p):
        active = step.domain in ("any", domain)
        cost = costs.get((step.config.name, problem.dtype_name))
        if active and cost is None and step.config.name in ENTRIES_PER_TRIP:
            return None
        total += step_estimate_us(step, cost, n_iters=problem.n_iters, n_checks=0, m=p.m,
                                  n=p.n, rows=T._rows_per_program(p), active=active)
    return total


# backend="auto" asks on every call of a training loop, whose shapes rarely change; bounded, so
# that a stream of new shapes cannot grow it
@functools.lru_cache(maxsize=256)
def expected_speedup(problem) -> float | None:
    """Estimated ``reference time / Triton time`` for a call (a CUDA one: only those are
    described), or None where a kernel has no recorded cost. Without reading the cost (a device
    synchronisation) ``method="auto"`` may go either way; the reference's standard domain is its
    fast case, so that one is assumed: the cautious ratio."""
    est = triton_estimate_us(problem)
    if est is None:
        return None
    ref = reference_estimate_us(problem.B, problem.m, problem.n, problem.n_iters,
                                problem.method == "log",
                                8 if problem.dtype_name == "float64" else 4, problem.kd,
                                problem.shared)
    return ref / est
