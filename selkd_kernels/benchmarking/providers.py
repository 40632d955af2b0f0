"""Implementations under test ("providers"), one per (op, implementation).

Ops:

* ``sinkhorn``: batched solve of docs/ops/sinkhorn.md on the workload's marginals; value = mean loss.
* ``kd-forward``: fused KD loss forward in a training step (student logits require grad, so
  implementations that differentiate through the iterations record their graph); value = loss.
* ``kd-forward-backward``: the same plus ``loss.backward()``.
* ``partial-ot``: open-set coupling (docs/ops/partial_ot.md), exact projection or Bregman rounds;
  value = ``sum(P * probe)`` for a fixed random probe, which tells couplings apart.
* ``open-set-loss``: ``sk.open_set_selkd_loss`` (teacher and student couplings, CE and
  distillation terms), forward+backward.
* ``assessment``: ``sk.assess_teachers`` (approx2) on a synthetic repository, time per teacher.

Providers of one family:

* ``selkd:<backend>``: the package through its public API, each compiled backend;
  ``selkd:cpp-256bit`` (CPUs with AVX-512 only) is the cpp backend with its shared-cost solve held
  to 256-bit vectors, to show what the 512-bit build adds.
* ``reference``: the public API with ``backend="torch"`` (the pure-PyTorch reference),
  ``reference:compiled`` the reference solve under ``torch.compile``, ``reference:unrolled`` the
  KD loss with autograd through the iterations (the comparison mode of docs/ops/sinkhorn.md).
* ``plain:scaling`` / ``plain:log``: batched PyTorch loops as a user would write them.
* ``pot:batch`` / ``pot:loop``: POT's batched solver and ``ot.sinkhorn`` per problem.

Partial-OT and assessment providers exist only when the package exposes ``sk.partial_ot`` /
``sk.assess_teachers``; the harness looks them up at run time.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..ops.partial_ot import dispatch as _partial_dispatch
from ..ops.registry import BACKEND_NAMES
from ..ops.sinkhorn import dispatch as _sinkhorn_dispatch
from ..ops.sinkhorn import reference as _ref
from ..ops.triton_device import interpreting
from . import baselines as BL
from .environment import cpp_vector_bits
from .workloads import Workload

OT_OPS = ("sinkhorn", "kd-forward", "kd-forward-backward")
OPEN_SET_OPS = ("partial-ot", "open-set-loss")
ALL_OPS = OT_OPS + OPEN_SET_OPS + ("assessment",)
OPS_BY_KIND = {"ot": OT_OPS, "open-set": OPEN_SET_OPS, "assessment": ("assessment",)}
COMPILED_BACKENDS = tuple(b for b in BACKEND_NAMES if b != "torch")


class NotApplicable(Exception):
    """This provider cannot run this op/workload here; the message says why (reported as n/a)."""


@dataclass
class Context:
    device: torch.device
    dtype: torch.dtype = torch.float32
    quick: bool = False
    # in --quick the compiled provider only checks graph capture: inductor code generation takes
    # tens of seconds per graph, more than the whole quick run may.
    compile_backend: str = "inductor"
    # ot.sinkhorn per problem is a Python loop: only where the batch is small
    max_loop_batch: int = 512


@dataclass
class Prepared:
    fn: Callable[[], Any]
    value: Callable[[Any], float]
    note: str = ""


@dataclass
class Provider:
    name: str
    family: str                       # selkd | reference | plain | pot
    op: str
    prepare: Callable[[Workload, Any, Context], Prepared]
    reference: Optional[str] = "reference"   # provider whose value this one must reproduce
    unavailable: Optional[str] = None        # reason it cannot run here at all
    untimed: Optional[str] = None            # reason it runs (quick) but is never timed
    compiles: bool = False                   # first call compiles; a failure there is "n/a"
    # bytes of (B, m, n) temporaries it keeps alive: (op, ctx, workload, log_domain) -> float
    dense_bytes: Optional[Callable[..., float]] = None
    tags: dict = field(default_factory=dict)


def _api():
    import selkd_kernels as sk
    return sk


def _scalar(x) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.detach().double().mean())
    return float(np.mean(x))


def _elem(ctx: Context) -> int:
    return torch.empty((), dtype=ctx.dtype).element_size()


def _method_for(w: Workload, inputs) -> str:
    return _ref.choose_method(inputs.cost, w.eps, inputs.cost.dtype)


def _raise_dynamo_limits():
    """Every (shape, eps, n_iters) is its own compiled graph; past the default limit Dynamo would
    silently fall back to eager and the "compiled" timing would be a lie."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 512))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)


def _compile(fn, ctx: Context):
    _raise_dynamo_limits()
    return torch.compile(fn, backend=ctx.compile_backend, dynamic=False)


# ----------------------------------------------------------------------------- backend status

def backend_status(name: str, device: torch.device, registry=None
                   ) -> tuple[Optional[str], Optional[str]]:
    """(unavailable reason, untimed reason) of a package backend of one op's ``registry``
    (Sinkhorn's by default) on ``device``."""
    registry = registry or _sinkhorn_dispatch.REGISTRY
    reason = registry.unavailable_reason(name)
    if reason is not None:
        return reason, None
    if name not in registry.available(device):
        return f"does not run on {device.type} tensors here", None
    if name == "triton" and device.type == "cpu" and interpreting():
        return None, "Triton interpreter (TRITON_INTERPRET=1): correctness only, never timed"
    return None, None


# ----------------------------------------------------------------------------- OT ops

def _kd_leaves(inputs):
    zs = inputs.student_logits.detach().clone().requires_grad_(True)
    zt = inputs.teacher_logits.detach()
    return zs, zt


def _kd_fn(loss_fn, zs, backward: bool):
    """Call pattern of one training step; grads reset so they do not accumulate across calls."""
    if backward:
        def fn():
            zs.grad = None
            loss = loss_fn()
            loss.backward()
            return loss.detach()
    else:
        def fn():
            return loss_fn().detach()
    return fn


def _prepare_selkd(backend: str, op: str, unrolled: bool = False):
    def prepare(w: Workload, inp, ctx: Context) -> Prepared:
        sk = _api()
        if op == "sinkhorn":
            def fn():
                return sk.sinkhorn(inp.a, inp.b, inp.cost, eps=w.eps, n_iters=w.n_iters,
                                   tol=None, backend=backend).loss
            return Prepared(fn, _scalar)
        zs, zt = _kd_leaves(inp)
        grad = "unrolled" if unrolled else "envelope"

        def loss_fn():
            return sk.sinkhorn_kd_loss(zs, zt, inp.cost, tau=w.tau, eps=w.eps, n_iters=w.n_iters,
                                       tol=None, backend=backend, grad=grad)
        return Prepared(_kd_fn(loss_fn, zs, op == "kd-forward-backward"), _scalar)
    return prepare


class _CompiledReferenceBackend:
    """A backend object whose fused KD forward is the compiled reference; plugged into the
    package's autograd Function so backward is the same envelope scaling as every backend."""
    name = "reference:compiled"

    def __init__(self, compiled_kd_forward):
        self._kd = compiled_kd_forward

    def kd_forward(self, student_logits, teacher_logits, cost, **_):
        return self._kd(student_logits, teacher_logits, cost)


def _prepare_compiled(op: str):
    def prepare(w: Workload, inp, ctx: Context) -> Prepared:
        from ..losses.sinkhorn_kd import kd_rows

        method = _method_for(w, inp)
        note = f"method={method}; backend={ctx.compile_backend}"
        if op == "sinkhorn":
            core = _ref.solve_standard if method == "standard" else _ref.solve_log
            compiled = _compile(functools.partial(core, eps=w.eps, n_iters=w.n_iters), ctx)

            def fn():
                return compiled(inp.a, inp.b, inp.cost).loss
            return Prepared(fn, _scalar, note)
        kd = _compile(functools.partial(_ref.kd_forward, tau=w.tau, eps=w.eps, n_iters=w.n_iters,
                                        tol=None, check_every=10, teacher_grad=False,
                                        method=method), ctx)
        be = _CompiledReferenceBackend(kd)
        zs, zt = _kd_leaves(inp)

        def loss_fn():
            rows, _, _ = kd_rows(zs, zt, inp.cost, be, w.tau, w.eps, w.n_iters, None, 10,
                                 method)
            return rows.mean()
        return Prepared(_kd_fn(loss_fn, zs, op == "kd-forward-backward"), _scalar, note)
    return prepare


def _prepare_plain(domain: str, op: str):
    def prepare(w: Workload, inp, ctx: Context) -> Prepared:
        if domain == "scaling" and not BL.scaling_is_safe(inp.cost, w.eps):
            raise NotApplicable(f"exp(-M/eps) underflows in {str(ctx.dtype).replace('torch.', '')}"
                                f" (max M/eps = {float(inp.cost.max()) / w.eps:.0f}); "
                                f"plain:log covers this workload")
        if op == "sinkhorn":
            solve = BL.plain_scaling_sinkhorn if domain == "scaling" else BL.plain_log_sinkhorn

            def fn():
                return solve(inp.a, inp.b, inp.cost, w.eps, w.n_iters)
            return Prepared(fn, _scalar)
        zs, zt = _kd_leaves(inp)

        def loss_fn():
            return BL.plain_kd_loss(zs, zt, inp.cost, w.tau, w.eps, w.n_iters, domain)
        return Prepared(_kd_fn(loss_fn, zs, op == "kd-forward-backward"), _scalar)
    return prepare


def _prepare_pot_batch(op: str):
    def prepare(w: Workload, inp, ctx: Context) -> Prepared:
        import ot.batch  # noqa: F401  (missing POT -> reported as n/a)
        log_domain = not BL.scaling_is_safe(inp.cost, w.eps)
        note = "log_sinkhorn" if log_domain else "sinkhorn"
        if op == "sinkhorn":
            def fn():
                return BL.pot_batch_rows(inp.a, inp.b, inp.cost, w.eps, w.n_iters, log_domain,
                                         grad="detach")
            return Prepared(fn, _scalar, note)
        zs, zt = _kd_leaves(inp)

        def loss_fn():
            a = torch.softmax(zt / w.tau, dim=-1)
            b = torch.softmax(zs / w.tau, dim=-1)
            # "envelope" in POT detaches the plan and gives no gradient to a and b
            return BL.pot_batch_rows(a, b, inp.cost, w.eps, w.n_iters, log_domain,
                                     grad="autodiff").mean()
        return Prepared(_kd_fn(loss_fn, zs, op == "kd-forward-backward"), _scalar,
                        note + ", grad=autodiff")
    return prepare


def _prepare_pot_loop(w: Workload, inp, ctx: Context) -> Prepared:
    import ot  # noqa: F401
    if w.B > ctx.max_loop_batch:
        raise NotApplicable(f"a Python loop over B={w.B} problems; only run for "
                            f"B <= {ctx.max_loop_batch}")
    log_domain = not BL.scaling_is_safe(inp.cost, w.eps)
    a_np = inp.a.detach().cpu().numpy()
    b_np = inp.b.detach().cpu().numpy()
    mt_np = inp.cost.detach().T.contiguous().cpu().numpy()

    def fn():
        return BL.pot_loop_rows(a_np, b_np, mt_np, w.eps, w.n_iters, log_domain)
    return Prepared(fn, _scalar, ("sinkhorn_log" if log_domain else "sinkhorn") + ", numpy")


def _dense(factor_fwd: float, factor_per_iter: float, only_log: bool = False,
           grad_ops=("kd-forward", "kd-forward-backward")):
    """Estimate of the (B, m, n) temporaries a provider keeps alive, in bytes: ``factor_fwd``
    tensors of B*m*n at once, plus ``factor_per_iter`` per iteration that autograd saves (about
    2.7 measured for the log-domain loops on `sharp`)."""
    def est(op, ctx, w: Workload, log_domain: bool) -> float:
        if only_log and not log_domain:
            return 0.0
        E = w.B * w.m * w.n * _elem(ctx)
        per_iter = factor_per_iter * w.n_iters if op in grad_ops else 0.0
        return E * (factor_fwd + per_iter)
    return est


CPP_VECTOR_ENV = "SELKD_CPU_VECTOR_BITS"


def _with_env(prepare, var: str, value: str):
    """``prepare`` whose calls run with the environment variable ``var`` set to ``value`` (the
    C++ backend reads SELKD_CPU_VECTOR_BITS on every call); setting it costs microseconds."""
    def wrapped(w: Workload, inp, ctx: Context) -> Prepared:
        with _env(var, value):
            prep = prepare(w, inp, ctx)

        def fn():
            with _env(var, value):
                return prep.fn()
        note = f"{var}={value}" + (f"; {prep.note}" if prep.note else "")
        return Prepared(fn, prep.value, note)
    return wrapped


class _env:
    """Set one environment variable for the duration of a ``with`` block."""

    def __init__(self, var: str, value: str):
        self.var, self.value = var, value

    def __enter__(self):
        self.old = os.environ.get(self.var)
        os.environ[self.var] = self.value

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop(self.var, None)
        else:
            os.environ[self.var] = self.old


def ot_providers(op: str, device: torch.device) -> list[Provider]:
    out = []
    for be in COMPILED_BACKENDS:
        unavailable, untimed = backend_status(be, device)
        out.append(Provider(f"selkd:{be}", "selkd", op, _prepare_selkd(be, op),
                            unavailable=unavailable, untimed=untimed))
    if device.type == "cpu" and cpp_vector_bits() == 512:
        out.append(Provider("selkd:cpp-256bit", "selkd", op,
                            _with_env(_prepare_selkd("cpp", op), CPP_VECTOR_ENV, "256")))
    out.append(Provider("reference", "reference", op, _prepare_selkd("torch", op), reference=None,
                        dense_bytes=_dense(3, 0, only_log=True)))
    out.append(Provider("reference:compiled", "reference", op, _prepare_compiled(op),
                        compiles=True))
    if op != "sinkhorn":
        out.append(Provider("reference:unrolled", "reference", op,
                            _prepare_selkd("torch", op, unrolled=True),
                            dense_bytes=_dense(3, 3, only_log=True)))
    out.append(Provider("plain:scaling", "plain", op, _prepare_plain("scaling", op)))
    out.append(Provider("plain:log", "plain", op, _prepare_plain("log", op),
                        dense_bytes=_dense(3, 3)))
    pot_missing = None
    try:
        import ot  # noqa: F401
    except ImportError as exc:
        pot_missing = f"POT not installed ({exc})"
    out.append(Provider("pot:batch", "pot", op, _prepare_pot_batch(op), unavailable=pot_missing,
                        dense_bytes=_dense(4, 3)))
    if op == "sinkhorn":
        out.append(Provider("pot:loop", "pot", op, _prepare_pot_loop, unavailable=pot_missing))
    return out


# ----------------------------------------------------------------------------- open-set ops

OPEN_SET_WEIGHT = 1.0  # lambda of the open-set loss (Eq. 14); any fixed value compares alike


def _prepare_partial_selkd(backend: str, method: str, op: str):
    def prepare(w: Workload, inp, ctx: Context) -> Prepared:
        sk = _api()
        if op == "partial-ot":
            def fn():
                return sk.partial_ot(inp.student_scores, inp.gamma, eps=w.eps, method=method,
                                     n_iters=w.n_iters, backend=backend)
            return Prepared(fn, lambda P: float((P.detach().double() * inp.probe.double()).sum()))
        zs = inp.student_scores.detach().clone().requires_grad_(True)

        def loss_fn():
            return sk.open_set_selkd_loss(zs, inp.teacher_scores, inp.target, gamma=inp.gamma, eps=w.eps,
                            weight=OPEN_SET_WEIGHT, method=method, n_iters=w.n_iters,
                            backend=backend)
        return Prepared(_kd_fn(loss_fn, zs, True), _scalar, "sk.open_set_selkd_loss, fwd+bwd")
    return prepare


def _prepare_partial_plain(method: str, op: str):
    def prepare(w: Workload, inp, ctx: Context) -> Prepared:
        if method == "exact":
            def coupling(z):
                return BL.plain_partial_exact(z, inp.gamma, w.eps)
        else:
            def coupling(z):
                return BL.plain_partial_bregman(z, inp.gamma, w.eps, w.n_iters)
        if op == "partial-ot":
            def fn():
                return coupling(inp.student_scores)
            return Prepared(fn, lambda P: float((P.detach().double() * inp.probe.double()).sum()))
        zs = inp.student_scores.detach().clone().requires_grad_(True)

        def loss_fn():
            return BL.plain_open_set_loss(coupling, zs, inp.teacher_scores, inp.target,
                                          OPEN_SET_WEIGHT)
        return Prepared(_kd_fn(loss_fn, zs, True), _scalar, "fwd+bwd")
    return prepare


def open_set_providers(op: str, device: torch.device) -> list[Provider]:
    out = []
    for method in ("exact", "bregman"):
        ref_name = f"reference:{method}"
        for be in BACKEND_NAMES:
            name = ref_name if be == "torch" else f"selkd:{be}:{method}"
            unavailable, untimed = backend_status(be, device, _partial_dispatch.REGISTRY)
            out.append(Provider(name, "reference" if be == "torch" else "selkd", op,
                                _prepare_partial_selkd(be, method, op),
                                reference=None if be == "torch" else ref_name,
                                unavailable=unavailable, untimed=untimed))
        out.append(Provider(f"plain:{method}", "plain", op, _prepare_partial_plain(method, op),
                            reference=ref_name))
    return out


# ----------------------------------------------------------------------------- assessment

def _prepare_assessment(backend: str):
    def prepare(w: Workload, inp, ctx: Context) -> Prepared:
        sk = _api()
        teachers = [sk.TeacherOutputs(name=f"teacher{i}", features=f, logits=z,
                                      classifier_weight=W)
                    for i, (f, z, W) in enumerate(zip(inp.features, inp.logits,
                                                      inp.classifier_weights))]

        def fn():
            # fixed iteration count (tol=None) so backends do the same work; no progress bar
            return sk.assess_teachers(teachers, inp.labels, num_classes=inp.num_classes,
                                      tau=w.tau, eps=w.eps, n_iters=w.n_iters, tol=None,
                                      backend=backend, progress=False)
        return Prepared(fn, _assessment_value, f"{w.n_teachers} teachers, approx2 (fictitious "
                                               f"linear students); time is per teacher")
    return prepare


def _assessment_value(out) -> float:
    return _scalar(torch.as_tensor(out.scores, dtype=torch.float64))


def assessment_providers(op: str, device: torch.device) -> list[Provider]:
    out = [Provider("reference", "reference", op, _prepare_assessment("torch"), reference=None,
                    tags={"per_teacher": True})]
    for be in COMPILED_BACKENDS:
        unavailable, untimed = backend_status(be, device)
        out.append(Provider(f"selkd:{be}", "selkd", op, _prepare_assessment(be),
                            unavailable=unavailable, untimed=untimed, tags={"per_teacher": True}))
    return out


def providers_for(op: str, device) -> list[Provider]:
    device = torch.device(device)
    if op in OT_OPS:
        return ot_providers(op, device)
    if op in OPEN_SET_OPS:
        return open_set_providers(op, device)
    if op == "assessment":
        return assessment_providers(op, device)
    raise ValueError(f"unknown op {op!r}; choose from {ALL_OPS}")


def select(providers: list[Provider], patterns: Optional[list[str]]) -> list[Provider]:
    """Keep the providers a pattern names. A pattern that is a provider's name keeps that one
    provider (``reference`` is the eager reference alone, although it is also a family's name);
    ``FAMILY:*``, or a family's name that no provider has, keeps the whole family."""
    if not patterns:
        return providers
    names = {p.name for p in providers}

    def keeps(p, pat):
        if pat in names:
            return p.name == pat
        family = pat[:-2] if pat.endswith(":*") else pat
        return p.family == family or p.name.startswith(family + ":")

    return [p for p in providers if any(keeps(p, pat) for pat in patterns)]
