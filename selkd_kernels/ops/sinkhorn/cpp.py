r"""C++ CPU backend (``backend="cpp"``) for the batched Sinkhorn solve and the fused KD forward.

The ops ``selkd::sinkhorn_solve`` and ``selkd::sinkhorn_kd_forward`` live in
``csrc/sinkhorn_cpu.cpp`` and are compiled into ``selkd_kernels._C``. They follow
:mod:`selkd_kernels.ops.sinkhorn.reference` exactly: per row, the entropic OT problem (paper 1, Eq. 5
and 12; ``H(T) = -sum T (log T - 1)``)

    S_eps(a, b) = min_{T 1 = a, T^T 1 = b, T >= 0} <T, M> - eps H(T),

solved through its dual (Eq. 13) by Sinkhorn's iteration (Alg. 3, Eq. 20) from ``u = v = 1``:
``u <- a / (K v)`` then ``v <- b / (K^T u)``, ``K = exp(-M/eps)``, potentials ``alpha = eps log u``,
``beta = eps log v``. The loss is the primal value of the last plan, ``<alpha, r> + <beta, b> -
eps sum(r)`` with ``r`` its row sums; with ``tol`` set, rows whose ``||r - a||_1`` is at most
``tol`` at a check (every ``check_every`` iterations and after the last) stop. The fused KD
forward also returns the envelope gradients of Prop. 4.2,
``dS/dz_S = (beta - <beta, p_S>) p_S / tau`` and ``dS/dz_T = (alpha - <alpha, p_T>) p_T / tau``.

When ``(max M - min M)/eps`` is small for the dtype (the reference's ``method="auto"`` rule) and the
cost is shared, the C++ code runs the plain scaling iteration on a precomputed ``K`` for blocks of
rows at once; otherwise it uses Schmitzer's stabilised scaling per row (potentials absorbed and the
row's kernel rebuilt in the log domain whenever a scaling leaves a safe range), which stays finite
for eps down to 1e-3 with costs up to 10. ``method`` ("auto", "standard", "log") forces a path.

On x86-64 the code is compiled for several instruction-set levels (baseline, FMA, AVX2,
AVX-512) and the best one the CPU supports is picked when the library loads. The shared-cost path
is also built with explicit 256-bit and 512-bit vectors: the 512-bit build runs where the CPU and
OS support AVX-512 (twice the multiply-add rate on cores with full-width units), unless the
environment variable ``SELKD_CPU_VECTOR_BITS=256`` is set (read on every call, for comparisons).
:func:`vector_bits` says which width runs.

Compute dtype: float64 if any input is float64, else float32 (half inputs are widened here).
Fake (meta) kernels are registered so the ops can be traced by ``torch.compile``.
"""
from __future__ import annotations

import torch

from ... import _extension
from ... import _validation as V
from .reference import STANDARD_DOMAIN_MAX_RANGE, KDForward, SolveOutput

_extension.require_ops("sinkhorn_solve", "sinkhorn_kd_forward", "cpu_vector_bits",
                       "marginal_flags")

_METHOD_CODE = {"auto": 0, "standard": 1, "log": 2}
# the kernels choose the iteration by the reference's own range limits
_STANDARD_RANGE = [STANDARD_DOMAIN_MAX_RANGE[torch.float32], STANDARD_DOMAIN_MAX_RANGE[torch.float64]]


def _register_fakes():
    # Output shapes and dtypes for tracing (torch.compile, FakeTensor); the shape relations are
    # checked with torch._check so a traced graph fails at the op, as the kernel would.
    try:
        @torch.library.register_fake("selkd::sinkhorn_solve")
        def _solve_fake(a, b, cost, eps, n_iters, tol, check_every, method, standard_range):
            B, m = a.shape
            n = b.shape[1]
            _check_fake_shapes(a, b, cost)
            return (a.new_empty((B,)), a.new_empty((B, m)), a.new_empty((B, n)),
                    a.new_empty((B,), dtype=torch.int32), a.new_empty((B,)))

        @torch.library.register_fake("selkd::sinkhorn_kd_forward")
        def _kd_fake(student_logits, teacher_logits, cost, tau, eps, n_iters, tol, check_every,
                     method, teacher_grad, standard_range):
            B, n = student_logits.shape
            m = teacher_logits.shape[1]
            _check_fake_shapes(teacher_logits, student_logits, cost)
            z = student_logits
            g_t = z.new_empty((B, m)) if teacher_grad else z.new_empty((0,))
            return (z.new_empty((B,)), z.new_empty((B, n)), g_t, z.new_empty((B, m)),
                    z.new_empty((B, n)), z.new_empty((B,), dtype=torch.int32), z.new_empty((B,)))
    except RuntimeError:
        # already registered: this module was reloaded in the same process
        pass


def _check_fake_shapes(a, b, cost):
    torch._check(a.dim() == 2 and b.dim() == 2, lambda: "marginals must be 2-D")
    torch._check(a.shape[0] == b.shape[0], lambda: "marginals must share the batch size")
    torch._check(a.dtype == b.dtype == cost.dtype, lambda: "inputs must share one dtype")
    if cost.dim() == 2:
        torch._check(cost.shape[0] == a.shape[1] and cost.shape[1] == b.shape[1],
                     lambda: "cost must be (m, n)")
    else:
        torch._check(cost.dim() == 3 and cost.shape[0] == a.shape[0] and
                     cost.shape[1] == a.shape[1] and cost.shape[2] == b.shape[1],
                     lambda: "cost must be (m, n) or (B, m, n)")


_register_fakes()


def vector_bits() -> int:
    """Vector width, in bits, of the shared-cost solve as it would run now: 512 (AVX-512), 256
    (AVX2), 128 (baseline x86-64), or 0 when the build left the choice to the compiler."""
    return int(torch.ops.selkd.cpu_vector_bits())


def _tol_arg(tol):
    # the op encodes "no tolerance" as a non-positive value (validated tolerances are > 0)
    return -1.0 if tol is None else float(tol)


class CppBackend:
    """Backend object for :mod:`selkd_kernels.ops.sinkhorn.dispatch` (CPU tensors only)."""

    name = "cpp"

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == "cpu"

    def marginal_flags(self, a, b, *, tol):
        """(a has a negative entry, b has one, some row's masses differ by more than ``tol``
        relative) in one C++ pass, or None where the op does not apply (other dtypes, devices)."""
        if a.device.type != "cpu" or b.device.type != "cpu" or a.dtype != b.dtype or \
                a.dtype not in (torch.float32, torch.float64):
            return None
        code = torch.ops.selkd.marginal_flags(a, b, float(tol))
        return bool(code & 1), bool(code & 2), bool(code & 4)

    def solve(self, a, b, cost, *, eps, n_iters, tol, check_every, method="auto"):
        cd = V.compute_dtype(a, b, cost)
        loss, alpha, beta, iters, err = torch.ops.selkd.sinkhorn_solve(
            a.to(cd), b.to(cd), cost.to(cd), float(eps), int(n_iters), _tol_arg(tol),
            int(check_every), _METHOD_CODE[method], _STANDARD_RANGE)
        return SolveOutput(loss, alpha, beta, iters, err)

    def kd_forward(self, student_logits, teacher_logits, cost, *, tau, eps, n_iters, tol,
                   check_every, teacher_grad, method="auto"):
        cd = V.compute_dtype(student_logits, teacher_logits, cost)
        loss, g_s, g_t, alpha, beta, iters, err = torch.ops.selkd.sinkhorn_kd_forward(
            student_logits.to(cd), teacher_logits.to(cd), cost.to(cd), float(tau), float(eps),
            int(n_iters), _tol_arg(tol), int(check_every), _METHOD_CODE[method],
            bool(teacher_grad), _STANDARD_RANGE)
        return KDForward(loss, g_s, g_t if teacher_grad else None, alpha, beta, iters, err)


BACKEND = CppBackend()
