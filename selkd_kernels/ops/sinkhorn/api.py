"""Public batched Sinkhorn solve: ``sk.sinkhorn`` (docs/ops/sinkhorn.md, docs/backends.md).

Gradients (docs/guarantees.md). The loss is differentiable w.r.t. ``a``, ``b`` and ``cost`` on
every backend, by the envelope theorem (paper 1, Prop. 4.2) from the returned potentials::

    dS/da = alpha,   dS/db = beta,   dS/dM = T = exp((alpha_i + beta_j - M_ij)/eps)

``S`` is only defined where the problem is balanced (``sum a = sum b``); the potentials are
determined up to ``(alpha + c, beta - c)``, a change no balanced perturbation ``(da, db)``
(``sum da = sum db``) can see, so the returned pair is a valid gradient and the one every backend
reports. Where a mass is 0 the one-sided derivative is ``-inf`` (the entropy's slope at 0); it is
returned as 0 there, so that a chain rule through a map whose derivative vanishes with the mass
(``softmax``, ``p**2``) stays finite. With ``create_graph=True`` the backward differentiates the
torch reference's iterations instead (as ``grad="unrolled"``), so second derivatives are never
silently dropped.
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Optional

import torch

from ... import _validation as V
from . import reference as _ref
from .dispatch import describe, get_backend


@dataclass
class SinkhornResult:
    """Result of :func:`sinkhorn`.

    Attributes:
        loss: (B,) primal value ``<T, M> - eps H(T)`` of the final plan.
        alpha: (B, m) dual potential of ``a`` (``eps log u``); ``-inf`` where ``a == 0``.
        beta: (B, n) dual potential of ``b`` (``eps log v``); ``-inf`` where ``b == 0``.
        iters: (B,) iterations each row ran.
        err: (B,) row-marginal error ``||T 1 - a||_1`` of the final plan.
        plan: (B, m, n) transport plan, only when ``return_plan=True``.
        backend: name of the backend that ran.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> a, b = torch.full((2, 3), 1 / 3), torch.full((2, 4), 1 / 4)
        >>> r = sk.sinkhorn(a, b, torch.rand(3, 4), eps=0.1, n_iters=500, tol=1e-8)
        >>> tuple(r.loss.shape), tuple(r.alpha.shape), tuple(r.beta.shape)
        ((2,), (2, 3), (2, 4))
        >>> bool((r.err < 1e-6).all()), r.plan is None
        (True, True)
    """
    loss: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    iters: torch.Tensor
    err: torch.Tensor
    plan: Optional[torch.Tensor] = None
    backend: str = "torch"


def validate_ot_inputs(a, b, cost, eps, n_iters, tol, check_every, method="auto"):
    V.check_ot_shapes(a, b, cost)
    eps = V.check_representable("eps", eps, V.compute_dtype(a, b, cost))
    n_iters = V.check_positive_int("n_iters", n_iters)
    tol = V.check_optional_positive("tol", tol)
    check_every = V.check_positive_int("check_every", check_every)
    V.check_choice("method", method, {"auto", "log", "standard"})
    return eps, n_iters, tol, check_every


class _Solver:
    """One configured solve: the backend and every option, so that the autograd function can
    run it in forward and rerun its unrolled reference twin in a double backward."""

    def __init__(self, be, eps, n_iters, tol, check_every, method, eps_scaling, scaling_iters):
        self.be, self.eps, self.n_iters, self.tol = be, eps, n_iters, tol
        self.check_every, self.method = check_every, method
        self.eps_scaling, self.scaling_iters = eps_scaling, scaling_iters

    def run(self, a, b, cost):
        if self.eps_scaling is None:
            return self.be.solve(a, b, cost, eps=self.eps, n_iters=self.n_iters, tol=self.tol,
                                 check_every=self.check_every, method=self.method)
        return self.reference(a, b, cost)

    def reference(self, a, b, cost):
        """The torch reference on the same problem, differentiable by autograd."""
        cd = V.compute_dtype(a, b, cost)
        return _ref.solve(a.to(cd), b.to(cd), cost.to(cd), eps=self.eps, n_iters=self.n_iters,
                          tol=self.tol, check_every=self.check_every, method=self.method,
                          eps_scaling=self.eps_scaling, scaling_iters=self.scaling_iters)


class _SinkhornFunction(torch.autograd.Function):
    """The loss of a solve that already ran; backward forms the envelope gradients from its
    potentials. The backend runs outside (a compiled op inside an autograd.Function's forward
    broke torch.compile(dynamic=True) of two calls in one graph, torch 2.13)."""

    @staticmethod
    def forward(ctx, a, b, cost, loss, alpha, beta, solver):
        ctx.solver = solver
        ctx.save_for_backward(a, b, cost, alpha, beta)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        a, b, cost, alpha, beta = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: a gradient that has a graph itself
            return (*_ref.unrolled_gradients(ctx.solver.reference, (a, b, cost), need, grad_loss),
                    None, None, None, None)
        w = grad_loss.to(alpha.dtype)
        ga = gb = gc = None
        if need[0]:
            ga = (_ref.marginal_gradient(alpha, a) * w.unsqueeze(-1)).to(a.dtype)
        if need[1]:
            gb = (_ref.marginal_gradient(beta, b) * w.unsqueeze(-1)).to(b.dtype)
        if need[2]:
            gc = _ref.cost_gradient(alpha, beta, cost.to(alpha.dtype), ctx.solver.eps,
                                    w).to(cost.dtype)
        return ga, gb, gc, None, None, None, None


def sinkhorn(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, *, eps: float = 0.1,
             n_iters: int = 100, tol: Optional[float] = None, check_every: int = 10,
             method: str = "auto", backend: str = "auto", return_plan: bool = False,
             check_marginals: bool = True, eps_scaling: Optional[float] = None,
             scaling_iters: int = 10, grad: str = "envelope") -> SinkhornResult:
    r"""Batched entropic OT between the rows of ``a`` and ``b`` (paper 1, Eq. 5; Alg. 3).

    Solves, independently for every row ``i``,

    .. math:: S_\varepsilon(a_i, b_i) = \min_{T\ge 0,\ T1=a_i,\ T^\top 1=b_i}
              \langle T, M\rangle - \varepsilon H(T), \quad H(T) = -\sum T(\log T - 1)

    by Sinkhorn's iteration from ``u = v = 1``: an alpha-update (``u <- a / K v``) then a beta-update
    (``v <- b / K^T u``), ``K = exp(-M/eps)``. The loss is the primal value of the plan after the
    last beta-update, ``<alpha, r> + <beta, b> - eps * sum(r)`` with ``r`` its row sums
    (docs/ops/sinkhorn.md), which equals the dual value ``<alpha,a> + <beta,b> - eps`` at convergence.

    Args:
        a: (B, m) source marginals (rows sum to 1; zeros allowed).
        b: (B, n) target marginals (rows sum to the same mass as ``a``).
        cost: (m, n) cost shared by all rows, or (B, m, n) one per row.
        eps: entropic regularisation, within the range the compute dtype represents
            (``[sqrt(tiny), sqrt(max)]``: about [1e-19, 1.8e19] in float32, docs/guarantees.md).
        n_iters: maximum number of iterations.
        tol: if given, a row stops once ``||r - a||_1 <= tol`` at a check.
        check_every: iterations between checks of ``tol`` (the last iteration is always checked).
        method: reference only. ``"log"`` (log-domain LSE updates, never underflows),
            ``"standard"`` (scaling updates, two matrix products per iteration) or ``"auto"``:
            standard when ``(max M - min M)/eps`` is small enough for the dtype, else log.
        backend: "auto", "torch", "cpp" or "triton" (see docs/backends.md).
        return_plan: also return the (B, m, n) plan (materialised; memory B*m*n).
        check_marginals: check (one device sync) that marginals are non-negative and that each
            row of ``a`` and ``b`` carries the same mass; a failure raises ValueError. While
            ``torch.compile`` traces, values are unknown and nothing can be raised: rows that
            fail the check get a NaN loss and error instead.
        eps_scaling: optional factor in (0, 1): anneal eps from the cost's range down to ``eps``,
            ``scaling_iters`` warm-started log-domain iterations per intermediate value, before the
            ``n_iters``/``tol`` iterations at ``eps`` (Schmitzer 2019). Use it for small eps, where
            plain Sinkhorn needs very many iterations (eps=1e-3 with a cost in [0, 10]). Runs the
            torch reference; ``iters`` counts every stage. At most 100 intermediate stages (a
            factor that would need more is tightened to reach ``eps`` in 100).
        grad: ``"envelope"`` (default): ``loss`` is differentiable w.r.t. ``a``, ``b``, ``cost``
            on every backend (module docs) and ``alpha``, ``beta``, ``plan`` carry no gradient.
            ``"unrolled"``: autograd through the torch reference's iterations; every output is
            differentiable, memory grows with the iterations (torch backend only).

    Accumulation is in float32 (float64 for float64 inputs); half inputs are accepted.

    Example:
        >>> import torch
        >>> from selkd_kernels import sinkhorn
        >>> a = torch.full((2, 3), 1 / 3)
        >>> b = torch.full((2, 4), 1 / 4)
        >>> cost = torch.rand(3, 4, requires_grad=True)
        >>> r = sinkhorn(a, b, cost, eps=0.1, n_iters=200, tol=1e-6)
        >>> r.loss.sum().backward()          # cost.grad = sum of the two plans
        >>> bool(torch.allclose(cost.grad.sum(), torch.tensor(2.0), atol=1e-4))
        True
    """
    eps, n_iters, tol, check_every = validate_ot_inputs(a, b, cost, eps, n_iters, tol,
                                                        check_every, method)
    V.check_choice("grad", grad, {"envelope", "unrolled"})
    torch_only = [what for what, on in (("eps_scaling", eps_scaling is not None),
                                        ("grad='unrolled'", grad == "unrolled")) if on]
    if eps_scaling is not None:
        eps_scaling = V.check_fraction("eps_scaling", eps_scaling)
        scaling_iters = V.check_positive_int("scaling_iters", scaling_iters)
    if torch_only and backend not in ("auto", "torch"):
        raise ValueError(f"backend {backend!r} does not implement {torch_only[0]}; use "
                         f"backend='torch' or 'auto'")
    be = (get_backend("torch", a.device) if torch_only else
          get_backend(backend, a.device,
                      describe(a, b, cost, method=method, n_iters=n_iters, kd=False)))
    rejected = _check_marginals(a, b, be) if check_marginals else None
    solver = _Solver(be, eps, n_iters, tol, check_every, method, eps_scaling, scaling_iters)
    if grad == "unrolled":
        out = solver.reference(a, b, cost)
        loss, alpha, beta, iters, err = out.loss, out.alpha, out.beta, out.iters, out.err
    else:
        with torch.no_grad():
            out = solver.run(a.detach(), b.detach(), cost.detach())
        alpha, beta, iters, err = out.alpha, out.beta, out.iters, out.err
        loss = _SinkhornFunction.apply(a, b, cost, out.loss, alpha, beta, solver)
    if rejected is not None:
        nan = torch.full_like(loss, math.nan)
        loss, err = torch.where(rejected, nan, loss), torch.where(rejected, nan.to(err.dtype), err)
    plan = None
    if return_plan:
        c = cost.to(alpha.dtype) if grad == "unrolled" else cost.detach().to(alpha.dtype)
        plan = _ref.transport_plan(alpha, beta, c, eps)
    return SinkhornResult(loss, alpha, beta, iters, err, plan, be.name)


def _marginal_violations(a, b, tol):
    """Per row: a negative entry in ``a``, in ``b``, and a mass gap beyond ``tol`` (relative)."""
    sa = a.sum(-1, dtype=torch.float64)
    sb = b.sum(-1, dtype=torch.float64)
    mass_gap = (sa - sb).abs() / sa.abs().clamp_min(1e-30)
    # rows with inf or NaN entries have a non-finite (or NaN) gap: they are left to surface
    # as NaN losses rather than be reported as unbalanced
    return (a < 0).any(-1), (b < 0).any(-1), (mass_gap > tol) & (mass_gap < math.inf)


def _check_marginals(a, b, be=None):
    """Raise ValueError for negative or unbalanced marginals. While traced, return instead the
    (B,) mask of rows that fail (the caller makes their loss NaN); None when eager."""
    # half formats round each entry by up to 2^-8 (bfloat16) relative, so row masses drift
    tol = 2e-2 if a.dtype in (torch.float16, torch.bfloat16) or b.dtype in (
        torch.float16, torch.bfloat16) else 1e-5
    if torch.compiler.is_compiling():
        neg_a, neg_b, unbalanced = _marginal_violations(a, b, tol)
        return neg_a | neg_b | unbalanced
    # a backend may do the check in one compiled pass (the cpp backend on CPU tensors); this runs
    # on every call and the torch version costs ~0.1 ms, 5-10% of a B = 256, 100-class CPU solve.
    fast = getattr(be, "marginal_flags", None)
    flags = fast(a, b, tol=tol) if fast is not None else None
    if flags is None:
        flags = torch.stack([x.any() for x in _marginal_violations(a, b, tol)]).tolist()
    if flags[0]:
        raise ValueError("a must be non-negative (each row a distribution over its m classes)")
    if flags[1]:
        raise ValueError("b must be non-negative (each row a distribution over its n classes)")
    if flags[2]:
        raise ValueError("b must carry the same mass as a in every row (balanced OT); "
                         "normalise both rows to sum to 1")
    return None


def transport_plan(result: SinkhornResult, cost: torch.Tensor, eps: float) -> torch.Tensor:
    """The (B, m, n) plan ``exp((alpha_i + beta_j - M_ij)/eps)`` of a :class:`SinkhornResult`.

    Example:
        >>> import torch
        >>> from selkd_kernels import sinkhorn, transport_plan
        >>> a, b = torch.full((1, 2), 0.5), torch.full((1, 2), 0.5)
        >>> M = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> T = transport_plan(sinkhorn(a, b, M, eps=0.1, n_iters=50), M, 0.1)
        >>> tuple(T.shape)
        (1, 2, 2)
    """
    eps = V.check_representable("eps", eps, result.alpha.dtype)
    return _ref.transport_plan(result.alpha, result.beta, cost.to(result.alpha.dtype), eps)
