r"""Triton backend (``backend="triton"``) of the batched Sinkhorn solve and the fused KD forward.

Mathematics: that of :mod:`selkd_kernels.ops.sinkhorn.reference` (paper 1, Eq. 5, 12-13 and
18-20, Alg. 3), which defines the right answer: for every row of the batch, Sinkhorn's iteration
``u <- a / (K v)``, ``v <- b / (K^T u)`` from ``u = v = 1`` (an alpha-update then a beta-update),
the loss ``<alpha, r> + <beta, b> - eps sum(r)`` of the plan after the last beta-update (``r`` its
row sums), the error ``||r - a||_1``, per-row stopping at ``tol`` checked every ``check_every``
iterations, and (fused KD forward, Eq. 10-12 and Prop. 4.2) the temperature softmaxes and the
envelope gradients ``dS/dz = (phi - <phi, p>) p / tau``.

Which kernel runs (docs/gpu.md), for a problem of ``B`` rows and ``m x n`` classes:

* shared cost, the reference's standard domain (``method="standard"``, or ``"auto"`` with
  ``(max M - min M) / eps`` small for the dtype): the tensor-core scaling solve,
  :mod:`.triton_scaling` (one launch, ``pow2(m) * pow2(n) <= 128^2``) or :mod:`.triton_gemm`
  (one batched product per half-iteration, many classes);
* the reference's log domain (small eps, ``method="log"``) and per-row costs: the stabilised
  scaling kernel :mod:`.triton_stabilized` (absorption, log-domain fallback), or for large class
  counts the tiled log-domain kernel :mod:`.triton_log`.

``method="auto"`` is decided on the device (each kernel reads ``min M``, ``max M`` and applies the
reference's rule), so no call synchronises with the host; the kernels for both domains are
launched and the one whose domain was not chosen returns at once.

Host side: float scalars are kernel arguments typed float64 (no per-call tensor, hence no
host-to-device copy); sizes, iteration counts and strides are ``do_not_specialize``, so a
training loop compiles each kernel once per dtype and class-count bucket; scratch comes from
PyTorch's caching allocator. Every call is a fixed sequence of launches with no host
synchronisation and can be captured in a CUDA graph.

Compute dtype: float32 for float16 / bfloat16 / float32 inputs, float64 if any input is float64.

Without a GPU: with ``TRITON_INTERPRET=1`` set before this module is imported, the kernels run
in Triton's interpreter on CPU tensors and :meth:`TritonBackend.supports` accepts CPU devices
(the test suite's mode; slow, for correctness only).

:func:`plan` lists the launches for a problem without running them; the offline compile report
(``benchmarks/triton_report.py``) compiles exactly those configurations.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

try:
    import triton
except Exception as exc:  # Triton is optional: the registry reports this backend as unavailable
    raise ImportError(f"selkd_kernels.ops.sinkhorn.triton needs Triton: {exc}") from exc

from ... import _validation as V
from ..triton_device import interpreting, quiet, triton_supports
from . import reference as _ref
from . import triton_gemm as TG
from . import triton_log as TLOG
from . import triton_scaling as TS
from . import triton_stabilized as TB

# Largest padded m * n the resident kernels hold per program.
RESIDENT_MAX_ELEMS = 128 * 128
# Tensor-core precision of the scaling kernels' products (docs/gpu.md, "Precision").
DOT_PRECISION = {torch.float32: "tf32x3", torch.float64: "ieee"}
# Stabilised kernel: absorb when a scaling leaves [1/BOUND, BOUND]; a scaling step whose
# denominators fall below FLOOR_SCALE * max(BM, BN) at an entry of positive mass is redone in the
# log domain (entries of the row's kernel lost to underflow could matter there).
STABILIZED_BOUND = {torch.float32: 2.0 ** 16, torch.float64: 2.0 ** 64}
STABILIZED_FLOOR_SCALE = {torch.float32: 2.0 ** -86, torch.float64: 2.0 ** -905}
# Tiles of the many-classes product (rows, output columns, contraction), of its row-wise
# prologue / epilogue, and of the log-domain kernel (rows, columns). Read at every call: the
# tests shrink them to reach the tiled paths with small problems.
GEMM_TILES = {torch.float32: (64, 64, 32), torch.float64: (16, 64, 16)}
ROWS_TILE = 32
LOG_TILES = (32, 128)
DEFAULT_SM_COUNT = 132

_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)
INT_POINTERS = ("iters_ptr", "iters_src_ptr", "active_ptr", "bad_ptr", "cbad_ptr")
INPUT_POINTERS = ("a_ptr", "b_ptr")


# triton.jit reads the flag when a kernel is defined, so CPU tensors work only if it was set then
_DEFINED_INTERPRETED = interpreting()


@dataclass(frozen=True)
class Problem:
    """What decides the launches of one call: sizes, compute dtype, shared or per-row cost, KD
    or plain solve, whether ``tol`` is set, ``method``, and the device's SM count."""
    B: int
    m: int
    n: int
    dtype: torch.dtype = torch.float32
    shared: bool = True
    kd: bool = False
    teacher_grad: bool = False
    has_tol: bool = False
    method: str = "auto"
    sm_count: int = DEFAULT_SM_COUNT
    interpreted: bool = False


@dataclass(frozen=True)
class KernelConfig:
    """One compiled kernel configuration: what the report compiles and the host launches."""
    name: str
    fn: object
    constexprs: tuple
    num_warps: int
    num_stages: int = 1

    @property
    def consts(self) -> dict:
        return dict(self.constexprs)


@dataclass(frozen=True)
class Step:
    """A launch of ``config`` on ``grid``; ``repeat`` says how often a call launches it:
    ``"once"``, ``"per-iteration"`` or ``"per-check"``."""
    config: KernelConfig
    grid: tuple
    repeat: str = "once"
    domain: str = "any"   # "standard" / "log": runs only where method="auto" picks that domain


def _pow2(x: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(int(x)))


def _warps_for(tile_elems: int) -> int:
    # about 32-64 tile values per thread: independent work to hide latency, no spills
    if tile_elems <= 1024:
        return 1
    if tile_elems <= 2048:
        return 2
    if tile_elems <= 4096:
        return 4
    return 8


def _cfg(name, fn, num_warps, **consts) -> KernelConfig:
    return KernelConfig(name, fn, tuple(sorted(consts.items())), num_warps)


def _domains(p: Problem) -> tuple[int | None, int | None]:
    """(scaling-path DOMAIN, log-path DOMAIN) codes (0: always runs, 1 / 2: runs where
    ``method="auto"`` picks the standard / log domain), None for a path that is not launched."""
    if not p.shared or p.method == "log":
        return None, 0
    if p.method == "standard":
        return 0, None
    return 1, 2


def _rows_per_program(p: Problem) -> int:
    if p.interpreted:
        # the interpreter runs programs one after another: fewer programs, fewer cost loads
        return max(1, min(p.B, 16))
    # one row per program until the batch is several times the SM count
    return max(1, min(8, p.B // (4 * p.sm_count)))


def _resident_rows(p: Problem) -> tuple[int, int]:
    """Rows per program and warps of the resident tensor-core kernel."""
    if p.dtype == torch.float64 or p.interpreted:
        return 16, 4
    # 32 rows read K from L1 half as often per row as 16; worth it once that still gives
    # about one program per SM
    return (32, 8) if triton.cdiv(p.B, 32) >= 0.9 * p.sm_count else (16, 4)


def _scaling_steps(p: Problem, domain: int) -> list[Step]:
    cd = p.dtype
    prec = DOT_PRECISION[cd]
    resident = _pow2(p.m) * _pow2(p.n) <= RESIDENT_MAX_ELEMS
    bb, bt, bk = GEMM_TILES[cd]
    # the many-classes products tile the padded classes by bt
    BM, BN = (_pow2(p.m), _pow2(p.n)) if resident else (_pow2(p.m, bt), _pow2(p.n, bt))
    steps = []
    tm, tn = min(BM, 64), min(BN, 64)
    steps.append(Step(_cfg("kernel-matrix", TS.kernel_matrix_kernel, 4, LDK=BN, TM=tm, TN=tn,
                           DOMAIN=domain, PRECISION=prec), (BM // tm, BN // tn)))
    dname = "standard" if domain == 1 else "any"
    if resident:
        bb, nw = _resident_rows(p)
        bk = 16 if (cd == torch.float64 or min(BM, BN) < 32) else 32
        steps.append(Step(_cfg("scaling-resident", TS.scaling_resident_kernel, nw, BB=bb, BM=BM,
                               BN=BN, BK=bk, BT=min(BM, BN, 32), KD=p.kd,
                               TEACHER_GRAD=p.kd and p.teacher_grad, HAS_TOL=p.has_tol,
                               DOMAIN=domain, PRECISION=prec),
                          (triton.cdiv(p.B, bb),), domain=dname))
        return steps
    LDM, LDN = BM, BN
    rb = triton.cdiv(p.B, bb)
    common = dict(BB=bb, BT=bt, BK=bk, DOMAIN=domain, PRECISION=prec)
    rows_bt = min(ROWS_TILE, LDM, LDN)
    steps.append(Step(_cfg("gemm-prepare", TG.rows_prepare_kernel, 4, LDM=LDM, LDN=LDN, BB=bb,
                           BT=rows_bt, KD=p.kd, DOMAIN=domain), (rb,), domain=dname))
    steps.append(Step(_cfg("gemm-alpha", TG.scaling_half_kernel, 4, LDX=LDN, LDY=LDM, LDK=LDN,
                           TRANS=True, COUNT=False, **common), (rb, LDM // bt), "per-iteration",
                      dname))
    steps.append(Step(_cfg("gemm-beta", TG.scaling_half_kernel, 4, LDX=LDM, LDY=LDN, LDK=LDN,
                           TRANS=False, COUNT=True, **common), (rb, LDN // bt), "per-iteration",
                      dname))
    if p.has_tol:
        steps.append(Step(_cfg("gemm-check", TG.check_partial_kernel, 4, LDN=LDN, LDM=LDM,
                               **common), (rb, LDM // bt), "per-check", dname))
    steps.append(Step(_cfg("gemm-finish-product", TG.finish_product_kernel, 4, LDN=LDN, LDM=LDM,
                           **common), (rb, LDM // bt), domain=dname))
    steps.append(Step(_cfg("gemm-finish-rows", TG.finish_rows_kernel, 4, LDM=LDM, LDN=LDN, BB=bb,
                           BT=rows_bt, KD=p.kd, TEACHER_GRAD=p.kd and p.teacher_grad,
                           DOMAIN=domain), (rb,), domain=dname))
    return steps


def _log_steps(p: Problem, domain: int) -> list[Step]:
    BM, BN = _pow2(p.m), _pow2(p.n)
    rows = _rows_per_program(p)
    grid = (triton.cdiv(p.B, rows),)
    dname = "log" if domain == 2 else "any"
    kd = dict(KD=p.kd, TEACHER_GRAD=p.kd and p.teacher_grad, HAS_TOL=p.has_tol, SHARED=p.shared,
              DOMAIN=domain)
    if BM * BN <= RESIDENT_MAX_ELEMS:
        problems = 1 if p.shared else p.B
        # float64 doubles the registers of the row's kernel: twice the threads to hold it
        nw = _warps_for(BM * BN) * (2 if p.dtype == torch.float64 and BM * BN > 4096 else 1)
        return [Step(_cfg("scaled-cost", TB.scaled_cost_kernel, _warps_for(BM * BN), BM=BM,
                          BN=BN), (problems,), domain=dname),
                Step(_cfg("stabilized", TB.stabilized_kernel, nw, BM=BM, BN=BN, **kd), grid,
                     domain=dname)]
    tm, tn = min(BM, LOG_TILES[0]), min(BN, LOG_TILES[1])
    return [Step(_cfg("log-streamed", TLOG.log_streamed_kernel, _warps_for(tm * tn), BM=tm,
                      BN=tn, **kd), grid, domain=dname)]


def plan(p: Problem) -> list[Step]:
    """The launches of one call on problem ``p``, in order (see the module docstring)."""
    scaling, log = _domains(p)
    steps = []
    if scaling is not None:
        steps += _scaling_steps(p, scaling)
    if log is not None:
        steps += _log_steps(p, log)
    return steps


def problem_for(a, b, cost, *, kd, teacher_grad=False, has_tol=False, method="auto") -> Problem:
    """The :class:`Problem` of a call on these tensors (``a``: source side, teacher for KD)."""
    dev = a.device
    return Problem(B=a.shape[0], m=a.shape[1], n=b.shape[1], dtype=V.compute_dtype(a, b, cost),
                   shared=cost.dim() == 2, kd=kd, teacher_grad=teacher_grad, has_tol=has_tol,
                   method=method, sm_count=_sm_count_of(dev), interpreted=dev.type != "cuda")


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count_of(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _f64(x: float):
    """A float kernel argument. Compiled kernels type these float64 (the launcher passes a C
    double); the interpreter would round a Python float to float32, so it gets a float64
    scalar of its own kind instead."""
    if not interpreting():
        return float(x)
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle
    return tl.tensor(TensorHandle(np.array([x], dtype=np.float64), tl.float64), tl.float64)


def _launch(step: Step, *args):
    cfg = step.config
    cfg.fn[step.grid](*args, **cfg.consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@dataclass
class _Call:
    """Tensors and scalars of one call, shared by every launch."""
    a: torch.Tensor
    b: torch.Tensor
    cost: torch.Tensor
    p: Problem
    eps: float
    n_iters: int
    tol: float | None
    check_every: int
    tau: float
    out: dict = field(default_factory=dict)

    def scalar(self, name):
        eps, tau, cd = self.eps, self.tau, self.p.dtype
        return _f64({"eps": eps, "unit": eps * _LN2, "scale": _LOG2E / eps, "inv_tau": 1.0 / tau,
                     "zscale": _LOG2E / tau, "tol": 0.0 if self.tol is None else self.tol,
                     "max_range": _ref.STANDARD_DOMAIN_MAX_RANGE.get(cd, 25.0)}[name])


def _outputs(c: _Call):
    p, dev, cd = c.p, c.a.device, c.p.dtype
    o = dict(alpha=torch.empty(p.B, p.m, dtype=cd, device=dev),
             beta=torch.empty(p.B, p.n, dtype=cd, device=dev),
             loss=torch.empty(p.B, dtype=cd, device=dev),
             err=torch.empty(p.B, dtype=cd, device=dev),
             iters=torch.empty(p.B, dtype=torch.int32, device=dev))
    o["gs"] = torch.empty(p.B, p.n, dtype=cd, device=dev) if p.kd else o["loss"]
    o["gt"] = torch.empty(p.B, p.m, dtype=cd, device=dev) if p.kd and p.teacher_grad else o["loss"]
    return o


def _run_kernel_matrix(c: _Call, step: Step, lo, hi):
    """(K head, K tail): in float64 the tail is the head's buffer (one product, nothing split)."""
    k = step.config.consts
    dev, cd = c.a.device, c.p.dtype
    rows = k["TM"] * step.grid[0]
    head = torch.empty(rows, k["LDK"], dtype=cd, device=dev)
    tail = torch.empty_like(head) if k["PRECISION"] == "tf32x3" else head
    M = c.cost
    _launch(step, M, M.stride(0), M.stride(1), lo, hi, head, tail, c.p.m, c.p.n, c.scalar("eps"),
            c.scalar("max_range"))
    return head, tail


def _run_resident(c: _Call, step: Step, mats, lo, hi):
    k = step.config.consts
    p, o, dev, cd = c.p, c.out, c.a.device, c.p.dtype
    rows = triton.cdiv(p.B, k["BB"]) * k["BB"]
    pa, s, u, r = (torch.empty(rows, k["BM"], dtype=cd, device=dev) for _ in range(4))
    pb, cc, v = (torch.empty(rows, k["BN"], dtype=cd, device=dev) for _ in range(3))
    a, b = c.a, c.b
    _launch(step, a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1), *mats, lo, hi, pa, pb,
            s, cc, u, v, r, o["alpha"], o["beta"], o["loss"], o["iters"], o["err"], o["gt"],
            o["gs"], p.B, p.m, p.n, c.n_iters, c.check_every, c.scalar("eps"), c.scalar("unit"),
            c.scalar("inv_tau"), c.scalar("zscale"), c.scalar("tol"), c.scalar("max_range"))


def _checks(c: _Call) -> list[int]:
    """Iterations after which ``tol`` is checked (the last one needs no check)."""
    if c.tol is None:
        return []
    return [t for t in range(c.check_every, c.n_iters, c.check_every)]


def _run_gemm(c: _Call, steps: dict, mats, lo, hi):
    prep = steps["gemm-prepare"].config.consts
    p, o, dev, cd = c.p, c.out, c.a.device, c.p.dtype
    LDM, LDN, bb = prep["LDM"], prep["LDN"], prep["BB"]
    bt = steps["gemm-alpha"].config.consts["BT"]
    rows = triton.cdiv(p.B, bb) * bb
    pa, s, u, r = (torch.empty(rows, LDM, dtype=cd, device=dev) for _ in range(4))
    pb, cc, v = (torch.empty(rows, LDN, dtype=cd, device=dev) for _ in range(3))
    active, bad, iters = (torch.empty(rows, dtype=torch.int32, device=dev) for _ in range(3))
    tiles = LDM // bt
    part = torch.zeros(rows, tiles, dtype=cd, device=dev)
    a, b = c.a, c.b
    eps, rng, tol = c.scalar("eps"), c.scalar("max_range"), c.scalar("tol")
    _launch(steps["gemm-prepare"], a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1), pa, pb,
            u, v, active, bad, iters, p.B, p.m, p.n, c.scalar("zscale"), lo, hi, eps, rng)
    checks = set(_checks(c))
    for t in range(1, c.n_iters + 1):
        _launch(steps["gemm-alpha"], v, *mats, pa, s, u, active, part, iters, tiles,
                int(t - 1 in checks), lo, hi, eps, tol, rng)
        _launch(steps["gemm-beta"], u, *mats, pb, cc, v, active, part, iters, tiles, 0, lo, hi,
                eps, tol, rng)
        if t in checks:
            _launch(steps["gemm-check"], v, *mats, pa, u, active, part, tiles, lo, hi, eps, rng)
    _launch(steps["gemm-finish-product"], v, *mats, u, r, lo, hi, eps, rng)
    _launch(steps["gemm-finish-rows"], pa, pb, s, cc, r, bad, iters, lo, hi, o["alpha"], o["beta"],
            o["loss"], o["iters"], o["err"], o["gt"], o["gs"], p.B, p.m, p.n, eps, c.scalar("unit"),
            c.scalar("inv_tau"), rng)


def _run_stabilized(c: _Call, steps: dict, lo, hi):
    sc, st = steps["scaled-cost"], steps["stabilized"]
    k = st.config.consts
    p, o, dev, cd = c.p, c.out, c.a.device, c.p.dtype
    M = c.cost
    problems = sc.grid[0]
    C = torch.empty(problems, k["BM"], k["BN"], dtype=cd, device=dev)
    cbad = torch.empty(problems, dtype=torch.int32, device=dev)
    strides = (0, M.stride(0), M.stride(1)) if p.shared else M.stride()
    _launch(sc, M, *strides, C, cbad, p.m, p.n, c.scalar("scale"))
    a, b = c.a, c.b
    bm, bn = k["BM"], k["BN"]
    bound = STABILIZED_BOUND[cd]
    floor = STABILIZED_FLOOR_SCALE[cd] * max(bm, bn)
    _launch(st, a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1), C, cbad, lo, hi,
            o["alpha"], o["beta"], o["loss"], o["iters"], o["err"], o["gt"], o["gs"], p.B, p.m,
            p.n, c.n_iters, c.check_every, _rows_per_program(p), c.scalar("eps"),
            c.scalar("unit"), c.scalar("inv_tau"), c.scalar("zscale"), c.scalar("tol"),
            c.scalar("max_range"), _f64(floor), _f64(bound))


def _run_log_streamed(c: _Call, step: Step, lo, hi):
    p, o, dev, cd = c.p, c.out, c.a.device, c.p.dtype
    M = c.cost
    strides = (0, M.stride(0), M.stride(1)) if p.shared else M.stride()
    f = torch.empty(p.B, p.m, dtype=cd, device=dev)
    g = torch.empty(p.B, p.n, dtype=cd, device=dev)
    lse = torch.empty(p.B, p.m, dtype=cd, device=dev)
    a, b = c.a, c.b
    _launch(step, a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1), M, *strides, lo, hi,
            f, g, lse, o["alpha"], o["beta"], o["loss"], o["iters"], o["err"], o["gt"], o["gs"],
            p.B, p.m, p.n, c.n_iters, c.check_every, _rows_per_program(p), c.scalar("eps"),
            c.scalar("unit"), c.scalar("scale"), c.scalar("inv_tau"), c.scalar("zscale"),
            c.scalar("tol"), c.scalar("max_range"))


def _solve(c: _Call):
    """Run :func:`plan` for one call; returns the output dict."""
    c.out = _outputs(c)
    steps = {s.config.name: s for s in plan(c.p)}
    lo = hi = c.out["loss"]  # not read unless a kernel needs min M / max M
    if "kernel-matrix" in steps or any(s.config.consts.get("DOMAIN", 0) for s in steps.values()):
        lo, hi = torch.aminmax(c.cost)
    with quiet(runtime_warnings=True):
        if "kernel-matrix" in steps:
            mats = _run_kernel_matrix(c, steps["kernel-matrix"], lo, hi)
            if "scaling-resident" in steps:
                _run_resident(c, steps["scaling-resident"], mats, lo, hi)
            else:
                _run_gemm(c, steps, mats, lo, hi)
        if "stabilized" in steps:
            _run_stabilized(c, steps, lo, hi)
        elif "log-streamed" in steps:
            _run_log_streamed(c, steps["log-streamed"], lo, hi)
    return c.out


class TritonBackend:
    """Registry entry ``"triton"`` (see :mod:`selkd_kernels.ops.sinkhorn.dispatch`)."""

    name = "triton"

    def supports(self, device) -> bool:
        return triton_supports(device, _DEFINED_INTERPRETED)

    def expected_speedup(self, problem) -> float | None:
        """Estimated speed-up over the torch reference on the same GPU for ``problem`` (a
        :class:`selkd_kernels.ops.sinkhorn.dispatch.SinkhornProblem`), from the offline compile
        report's model (:mod:`.triton_model`); None where no estimate applies (CPU tensors)."""
        from . import triton_model
        return triton_model.expected_speedup(problem)

    def _call(self, a, b, cost, *, kd, eps, n_iters, tol, check_every, method, tau=1.0,
              teacher_grad=False):
        p = problem_for(a, b, cost, kd=kd, teacher_grad=teacher_grad, has_tol=tol is not None,
                        method=method)
        return _solve(_Call(a, b, cost.to(p.dtype), p, float(eps), int(n_iters),
                            None if tol is None else float(tol), int(check_every), float(tau)))

    def solve(self, a, b, cost, *, eps, n_iters, tol=None, check_every=10, method="auto"):
        """Batched Sinkhorn solve (see the module docstring for the kernel chosen)."""
        o = self._call(a, b, cost, kd=False, eps=eps, n_iters=n_iters, tol=tol,
                       check_every=check_every, method=method)
        return _ref.SolveOutput(o["loss"], o["alpha"], o["beta"], o["iters"], o["err"])

    def kd_forward(self, student_logits, teacher_logits, cost, *, tau, eps, n_iters, tol=None,
                   check_every=10, teacher_grad=False, method="auto"):
        """Fused KD forward from logits (teacher = source ``a``, student = target ``b``)."""
        o = self._call(teacher_logits, student_logits, cost, kd=True, eps=eps, n_iters=n_iters,
                       tol=tol, check_every=check_every, method=method, tau=tau,
                       teacher_grad=teacher_grad)
        return _ref.KDForward(o["loss"], o["gs"], o["gt"] if teacher_grad else None, o["alpha"],
                              o["beta"], o["iters"], o["err"])


BACKEND = TritonBackend()
