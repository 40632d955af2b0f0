"""The C++ CPU backend against the pure-PyTorch reference (same inputs, same iteration counts).

What "the right answer" is. Both implementations round differently (FMA, summation order,
stabilised scaling against log-sum-exp). In float32 the reference's own log-domain iteration loses
accuracy when M/eps is large (eps = 1e-3, costs up to 10: its loss is ~3e-5 off the float64 value,
the C++ one ~1e-7), so float32 results are compared with the reference run in float64 on the same
(exactly representable) inputs, and iteration counts with the float32 reference. Tolerances, per
compute dtype: the loss to 1e-5 relative (float32) / 1e-10 (float64), with an absolute floor
proportional to the cost's scale since the loss is a difference of terms as large as max|M|;
potentials and gradients to a few float32 ulps of that scale; the marginal error to 1e-3 relative.
"""
import math

import pytest
import torch

import selkd_kernels as sk
from tests import utils as U
from tests.utils import TOL
from selkd_kernels.ops import registry
from selkd_kernels.ops.sinkhorn import dispatch
from selkd_kernels.ops.sinkhorn import reference as ref

cpp = pytest.importorskip("selkd_kernels.ops.sinkhorn.cpp",
                          reason="C++ extension selkd_kernels._C not built")
BE = cpp.BACKEND

SHAPES = [(3, 1, 1), (4, 7, 13), (1, 13, 7), (5, 16, 16), (37, 7, 13)]  # 37: full and tail blocks
# (eps, cost scale): eps = 1e-3 with costs up to 10 is the hardest regime the package promises
EPS_SCALE = [(1e-3, 10.0), (1e-2, 1.0), (0.1, 1.0), (1.0, 1.0)]


def _marginals(B, k, dtype, zeros=False):
    return U.marginals(B, k, dtype, zeros=zeros)


def _cost(B, m, n, scale, dtype, per_row):
    return U.cost(m, n, dtype, scale=scale, batch=B if per_row else None)


def _assert_potential(got, want, atol):
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got)), "-inf entries differ"
    assert torch.equal(want[~fin], got[~fin])
    torch.testing.assert_close(got[fin], want[fin], rtol=0, atol=atol)


def _assert_solve_close(got, want, dtype, scale):
    t = TOL[dtype]
    s = max(1.0, scale)
    torch.testing.assert_close(got.loss, want.loss, rtol=t["loss_rtol"], atol=t["loss_atol"] * s)
    _assert_potential(got.alpha, want.alpha, t["pot_atol"] * s)
    _assert_potential(got.beta, want.beta, t["pot_atol"] * s)
    assert got.iters.dtype == torch.int32
    assert torch.equal(got.iters, want.iters)
    torch.testing.assert_close(got.err, want.err, rtol=t["err_rtol"], atol=t["err_atol"])


def _run_both(a, b, M, **kw):
    """(cpp result, reference in float64 cast back to the input dtype, reference in the input
    dtype). Values are checked against the second, iteration counts against the third."""
    kw.setdefault("check_every", 10)
    kw.setdefault("tol", None)
    got = BE.solve(a, b, M, **kw)
    same = ref.solve(a, b, M, **kw)
    if a.dtype == torch.float64:
        return got, same, same
    w = ref.solve(a.double(), b.double(), M.double(), **kw)
    want = ref.SolveOutput(w.loss.to(a.dtype), w.alpha.to(a.dtype), w.beta.to(a.dtype),
                           same.iters, w.err.to(a.dtype))
    return got, want, same


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
@pytest.mark.parametrize("eps,scale", EPS_SCALE)
@pytest.mark.parametrize("B,m,n", SHAPES)
def test_solve_matches_reference(B, m, n, eps, scale, per_row, dtype):
    a, b = _marginals(B, m, dtype), _marginals(B, n, dtype)
    M = _cost(B, m, n, scale, dtype, per_row)
    got, want, _ = _run_both(a, b, M, eps=eps, n_iters=40)
    assert got.loss.dtype == dtype and got.alpha.shape == (B, m) and got.beta.shape == (B, n)
    assert torch.isfinite(got.loss).all()
    _assert_solve_close(got, want, dtype, scale)


@pytest.mark.parametrize("method", ["standard", "log"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forced_method_matches_reference(method, dtype):
    # both C++ paths (blocked standard-domain scaling and per-row stabilised scaling) on the same
    # well-conditioned problem, against the reference forced the same way
    a, b = _marginals(9, 11, dtype), _marginals(9, 6, dtype)
    M = _cost(9, 11, 6, 1.0, dtype, False)
    got, want, _ = _run_both(a, b, M, eps=0.2, n_iters=30, method=method)
    _assert_solve_close(got, want, dtype, 1.0)


# The shared-cost path has 128-, 256- and 512-bit builds (blocks of 8 / 16 / 32 float32 rows,
# 4 / 8 / 16 float64 rows); batch sizes around those block sizes cover full blocks, half-empty
# blocks run with one vector and the single-vector tail.
WIDTH_SHAPES = [(1, 5, 3), (9, 12, 10), (20, 17, 11), (33, 6, 7), (70, 9, 13)]
VECTOR_ENV = "SELKD_CPU_VECTOR_BITS"


def _cpu_flags() -> set:
    # read independently of the extension's own detection
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


CPU_FLAGS = _cpu_flags()
HAS_AVX512 = {"avx512f", "avx512vl", "avx512dq", "avx512bw"} <= CPU_FLAGS
HAS_AVX2 = "avx2" in CPU_FLAGS


def _build_reports_widths() -> bool:
    # GCC x86-64 builds pick the width themselves; other builds report 0 (compiler's choice)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(VECTOR_ENV, "128")
        return cpp.vector_bits() != 0


def _widths():
    return [pytest.param("128", id="sse2"), pytest.param("256", id="avx2"),
            pytest.param("512", id="avx512", marks=pytest.mark.skipif(
                not (HAS_AVX512 and _build_reports_widths()),
                reason="CPU or build without the AVX-512 path"))]


@pytest.mark.parametrize("width", _widths())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps,tol", [(0.1, None), (0.02, None), (0.05, 1e-4)])
@pytest.mark.parametrize("B,m,n", WIDTH_SHAPES)
def test_vector_widths_match_reference(B, m, n, eps, tol, dtype, width, monkeypatch):
    # eps = 0.02 on costs in [0, 1] puts float32 input in the band run as float64 scaling
    monkeypatch.setenv(VECTOR_ENV, width)
    if _build_reports_widths():
        want_bits = {"128": 128, "256": 256 if HAS_AVX2 else 128, "512": 512}[width]
        assert cpp.vector_bits() == want_bits
    a, b = _marginals(B, m, dtype, zeros=True), _marginals(B, n, dtype)
    M = _cost(B, m, n, 1.0, dtype, False)
    got, want, _ = _run_both(a, b, M, eps=eps, n_iters=60, tol=tol, check_every=5)
    _assert_solve_close(got, want, dtype, 1.0)
    if tol is not None:
        assert (got.iters < 60).any(), "no row stopped early: the tolerance is not exercised"
    # the fused KD forward goes through the same blocked solve
    zs, zt = torch.randn(B, n, dtype=dtype), torch.randn(B, m, dtype=dtype)
    kw = dict(tau=2.0, eps=eps, n_iters=60, tol=tol, check_every=5, teacher_grad=True)
    kd = BE.kd_forward(zs, zt, M, **kw)
    same = ref.kd_forward(zs, zt, M, **kw)
    want = ref.kd_forward(zs.double(), zt.double(), M.double(), **kw)
    t, close = TOL[dtype], dict(check_dtype=False)
    torch.testing.assert_close(kd.loss, want.loss, rtol=t["loss_rtol"], atol=t["loss_atol"],
                               **close)
    torch.testing.assert_close(kd.grad_student, want.grad_student, rtol=0, atol=t["grad_atol"],
                               **close)
    torch.testing.assert_close(kd.grad_teacher, want.grad_teacher, rtol=0, atol=t["grad_atol"],
                               **close)
    assert torch.equal(kd.iters, same.iters)


def test_vector_width_default_is_the_widest_the_cpu_has(monkeypatch):
    monkeypatch.delenv(VECTOR_ENV, raising=False)
    if not _build_reports_widths():
        pytest.skip("this build leaves the vector width to the compiler")
    assert cpp.vector_bits() == (512 if HAS_AVX512 else 256 if HAS_AVX2 else 128)


@pytest.mark.parametrize("value", ["foo", "64", "1024", " 256"])
def test_vector_width_env_var_rejects_other_values(value, monkeypatch):
    monkeypatch.setenv(VECTOR_ENV, value)
    with pytest.raises(ValueError, match=VECTOR_ENV):
        cpp.vector_bits()
    a = _marginals(2, 3, torch.float32)
    with pytest.raises(ValueError, match=VECTOR_ENV):  # whichever path the solve takes
        BE.solve(a, a, torch.rand(3, 3), eps=0.1, n_iters=3, tol=None, check_every=1)


def test_512_bits_without_avx512_is_an_error(monkeypatch):
    if HAS_AVX512 and _build_reports_widths():
        pytest.skip("this CPU and build have the 512-bit path")
    monkeypatch.setenv(VECTOR_ENV, "512")
    with pytest.raises(ValueError, match="AVX-512"):
        cpp.vector_bits()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_1024_classes(eps, dtype):
    B, C = 2, 1024
    a, b = _marginals(B, C, dtype), _marginals(B, C, dtype)
    M = _cost(B, C, C, 1.0, dtype, False)
    got, want, _ = _run_both(a, b, M, eps=eps, n_iters=8)
    _assert_solve_close(got, want, dtype, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
@pytest.mark.parametrize("eps,scale", [(1e-2, 1.0), (0.1, 1.0), (1e-3, 10.0)])
def test_zero_mass_entries(eps, scale, per_row, dtype):
    B, m, n = 4, 9, 8
    a, b = _marginals(B, m, dtype, zeros=True), _marginals(B, n, dtype, zeros=True)
    M = _cost(B, m, n, scale, dtype, per_row)
    got, want, _ = _run_both(a, b, M, eps=eps, n_iters=30)
    assert torch.isfinite(got.loss).all()
    assert torch.isneginf(got.alpha[:, 1]).all() and torch.isneginf(got.beta[:, 1]).all()
    assert not torch.isnan(got.alpha).any() and not torch.isnan(got.beta).any()
    _assert_solve_close(got, want, dtype, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_non_contiguous_inputs(per_row, dtype):
    B, m, n = 6, 7, 5
    a = _marginals(B, m, dtype).t().contiguous().t()          # transposed storage
    b = torch.zeros(B, 2 * n, dtype=dtype)
    b[:, ::2] = _marginals(B, n, dtype)
    b = b[:, ::2]                                              # stride-2 view
    M = _cost(B, n, m, 1.0, dtype, per_row).transpose(-1, -2)  # (.., m, n) transposed view
    assert not (a.is_contiguous() or b.is_contiguous() or M.is_contiguous())
    got, want, _ = _run_both(a, b, M, eps=0.05, n_iters=25)
    got_c = BE.solve(a.contiguous(), b.contiguous(), M.contiguous(), eps=0.05, n_iters=25,
                     tol=None, check_every=10)
    _assert_solve_close(got, want, dtype, 1.0)
    assert torch.equal(got.loss, got_c.loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
@pytest.mark.parametrize("eps,check_every", [(0.1, 1), (0.05, 3), (0.01, 10)])
def test_early_stopping_iterations(eps, check_every, per_row, dtype):
    B, m, n = 12, 8, 10
    a, b = _marginals(B, m, dtype), _marginals(B, n, dtype)
    M = _cost(B, m, n, 1.0, dtype, per_row)
    got, want, _ = _run_both(a, b, M, eps=eps, n_iters=300, tol=1e-4, check_every=check_every)
    assert (got.iters < 300).any(), "no row converged: the test would not exercise the tolerance"
    assert (got.iters % check_every == 0).all() | (got.iters == 300).all()
    _assert_solve_close(got, want, dtype, 1.0)
    assert (got.err[got.iters < 300] <= 1e-4).all()


def test_without_tol_runs_all_iterations():
    a, b = _marginals(5, 4, torch.float32), _marginals(5, 3, torch.float32)
    out = BE.solve(a, b, torch.rand(4, 3), eps=0.1, n_iters=17, tol=None, check_every=5)
    assert out.iters.tolist() == [17] * 5


@pytest.mark.parametrize("where", ["a", "b", "cost_row", "cost_shared"])
def test_nan_input_gives_nan_loss(where):
    B, m, n = 4, 5, 6
    a, b = _marginals(B, m, torch.float32), _marginals(B, n, torch.float32)
    M = _cost(B, m, n, 1.0, torch.float32, where == "cost_row")
    if where == "a":
        a[1, 2] = float("nan")
    elif where == "b":
        b[1, 0] = float("inf")
    else:
        M[(1, 2, 3) if where == "cost_row" else (2, 3)] = float("nan")
    out = BE.solve(a, b, M, eps=0.1, n_iters=20, tol=1e-6, check_every=5)
    want = ref.solve(a, b, M, eps=0.1, n_iters=20, tol=1e-6, check_every=5)
    bad = torch.zeros(B, dtype=torch.bool)
    bad[1] = True
    if where == "cost_shared":
        bad[:] = True
    assert torch.isnan(out.loss[bad]).all() and torch.isnan(out.err[bad]).all()
    assert torch.equal(torch.isnan(out.loss), torch.isnan(want.loss))
    torch.testing.assert_close(out.loss[~bad], want.loss[~bad], rtol=1e-5, atol=2e-6)


# ---------------------------------------------------------------- fused KD forward and gradients
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
@pytest.mark.parametrize("eps,scale", [(1e-3, 10.0), (1e-2, 1.0), (0.1, 1.0), (1.0, 1.0)])
@pytest.mark.parametrize("B,C_T,C_S", [(1, 13, 7), (6, 10, 10), (3, 1, 4)])
def test_kd_forward_matches_reference(B, C_T, C_S, eps, scale, per_row, dtype):
    zs = 3 * torch.randn(B, C_S, dtype=dtype)
    zt = 3 * torch.randn(B, C_T, dtype=dtype)
    M = _cost(B, C_T, C_S, scale, dtype, per_row)
    kw = dict(tau=2.0, eps=eps, n_iters=30, tol=None, check_every=10, teacher_grad=True)
    same = ref.kd_forward(zs, zt, M, **kw)
    want = ref.kd_forward(zs.double(), zt.double(), M.double(), **kw)  # see the module docstring
    got = BE.kd_forward(zs, zt, M, **kw)
    assert got.loss.dtype == dtype
    t, s = TOL[dtype], max(1.0, scale)
    close = dict(check_dtype=False)
    torch.testing.assert_close(got.loss, want.loss, rtol=t["loss_rtol"], atol=t["loss_atol"] * s,
                               **close)
    torch.testing.assert_close(got.grad_student, want.grad_student, rtol=0,
                               atol=t["grad_atol"] * s, **close)
    torch.testing.assert_close(got.grad_teacher, want.grad_teacher, rtol=0,
                               atol=t["grad_atol"] * s, **close)
    assert torch.equal(got.iters, same.iters)
    no_t = BE.kd_forward(zs, zt, M, **{**kw, "teacher_grad": False})
    assert no_t.grad_teacher is None and torch.equal(no_t.loss, got.loss)


def test_kd_zero_probabilities_and_half_inputs():
    # -inf logits give exactly zero mass: no NaN anywhere, zero gradient there
    zs = torch.randn(4, 6)
    zt = torch.randn(4, 5)
    zs[:, 2] = float("-inf")
    zt[0, 0] = float("-inf")
    M = torch.rand(5, 6)
    kw = dict(tau=1.5, eps=0.05, n_iters=40, tol=None, check_every=10, teacher_grad=True)
    got, want = BE.kd_forward(zs, zt, M, **kw), ref.kd_forward(zs, zt, M, **kw)
    assert torch.isfinite(got.loss).all() and torch.isfinite(got.grad_student).all()
    assert (got.grad_student[:, 2] == 0).all() and got.grad_teacher[0, 0] == 0
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(got.grad_student, want.grad_student, rtol=0, atol=1e-5)
    half = BE.kd_forward(zs.half(), zt.bfloat16(), M.half(), **kw)
    want_h = ref.kd_forward(zs.half().float(), zt.bfloat16().float(), M.half().float(), **kw)
    assert half.loss.dtype == torch.float32
    torch.testing.assert_close(half.loss, want_h.loss, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kd_softmax_keeps_subnormal_probabilities(dtype):
    # logit gaps beyond ~87 * tau (float32) give probabilities that torch.softmax returns as
    # subnormals, not zeros; the op's vectorised exp flushes there, so it must redo those entries
    # or its zero pattern (and hence which potentials are -inf) would differ from the reference
    scale = 60.0 if dtype == torch.float32 else 400.0
    torch.manual_seed(3)
    z = scale * torch.randn(6, 11, dtype=dtype)
    p = torch.softmax(z, -1)
    tiny = torch.finfo(dtype).tiny
    assert ((p > 0) & (p < tiny)).any(), "no subnormal probability: the test would not bite"
    M = _cost(6, 11, 11, 10.0, dtype, False)
    kw = dict(tau=1.0, eps=1e-3, n_iters=20, tol=None, check_every=10, teacher_grad=True,
              method="log")
    got = BE.kd_forward(z, z, M, **kw)
    want = ref.kd_forward(z, z, M, **kw)
    assert torch.equal(torch.isinf(got.alpha), torch.isinf(want.alpha))
    assert torch.equal(torch.isinf(got.beta), torch.isinf(want.beta))
    assert torch.isfinite(got.loss).all()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-4)


def test_kd_nan_logits_give_nan_loss():
    zs, zt = torch.randn(3, 4), torch.randn(3, 5)
    zt[2, 1] = float("nan")
    loss = sk.sinkhorn_kd_loss(zs, zt, torch.rand(5, 4), reduction="none", backend="cpp")
    assert torch.isnan(loss[2]) and torch.isfinite(loss[:2]).all()


@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_gradients_finite_differences_float64(per_row):
    # converged potentials make the envelope gradients exact (docs/ops/sinkhorn.md): compare with central
    # differences of the cpp loss itself, for student logits, teacher logits and the cost
    B, C_T, C_S = 3, 5, 4
    zs = torch.randn(B, C_S, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(B, C_T, dtype=torch.float64, requires_grad=True)
    M = _cost(B, C_T, C_S, 1.0, torch.float64, per_row).requires_grad_(True)

    def f(zs, zt, M):
        return sk.sinkhorn_kd_loss(zs, zt, M, tau=2.0, eps=0.3, n_iters=2000, tol=1e-14,
                                   check_every=5, reduction="none", backend="cpp")

    assert torch.autograd.gradcheck(f, (zs, zt, M), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_public_api_uses_cpp_and_matches_torch():
    zs = torch.randn(8, 10, requires_grad=True)
    zt = torch.randn(8, 12)
    M = torch.rand(12, 10)
    grads = {}
    for name in ("torch", "cpp"):
        loss = sk.sinkhorn_kd_loss(zs, zt, M, tau=3.0, eps=0.1, n_iters=50, backend=name)
        grads[name], = torch.autograd.grad(loss, zs)
        grads[name + "_loss"] = loss.detach()
    torch.testing.assert_close(grads["cpp_loss"], grads["torch_loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["cpp"], grads["torch"], rtol=0, atol=1e-6)
    r = sk.sinkhorn(torch.softmax(zt, -1), torch.softmax(zs.detach(), -1), M, backend="cpp")
    assert r.backend == "cpp"


# ---------------------------------------------------------------- dispatch
def test_available_backends_lists_cpp():
    assert "cpp" in sk.available_backends()
    assert "cpp" in sk.available_backends("cpu")
    if not torch.cuda.is_available():
        assert "cpp" not in sk.available_backends("meta")


def test_auto_picks_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    assert dispatch.get_backend("auto", torch.device("cpu")).name == "cpp"
    a = _marginals(2, 3, torch.float32)
    assert sk.sinkhorn(a, a, torch.rand(3, 3)).backend == "cpp"


@pytest.mark.parametrize("forced", ["torch", "cpp"])
def test_env_var_forces_backend(monkeypatch, forced):
    monkeypatch.setenv(registry.ENV_VAR, forced)
    assert dispatch.get_backend("auto", torch.device("cpu")).name == forced
    a = _marginals(2, 3, torch.float32)
    assert sk.sinkhorn(a, a, torch.rand(3, 3), backend="auto").backend == forced
    monkeypatch.setenv(registry.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=registry.ENV_VAR):
        dispatch.get_backend("auto", torch.device("cpu"))


def test_cpp_rejects_non_cpu_device():
    with pytest.raises(ValueError, match="cpp"):
        dispatch.get_backend("cpp", torch.device("meta"))


RANGE = cpp._STANDARD_RANGE


def test_op_validation_raises_value_error():
    a = _marginals(2, 3, torch.float32)
    solve = torch.ops.selkd.sinkhorn_solve
    with pytest.raises(ValueError, match="cost"):
        solve(a, a, torch.rand(4, 3), 0.1, 10, -1.0, 10, 0, RANGE)
    with pytest.raises(ValueError, match="eps"):
        solve(a, a, torch.rand(3, 3), 0.0, 10, -1.0, 10, 0, RANGE)
    with pytest.raises(ValueError, match="dtype"):
        solve(a, a.double(), torch.rand(3, 3), 0.1, 10, -1.0, 10, 0, RANGE)
    with pytest.raises(ValueError, match="standard_range"):
        solve(a, a, torch.rand(3, 3), 0.1, 10, -1.0, 10, 0, [0.0, 200.0])
    with pytest.raises(ValueError, match="tau"):
        torch.ops.selkd.sinkhorn_kd_forward(a, a, torch.rand(3, 3), -1.0, 0.1, 10, -1.0, 10, 0,
                                            False, RANGE)
    with pytest.raises(ValueError, match="marginal_flags"):
        torch.ops.selkd.marginal_flags(a, a[:1], 1e-5)
    with pytest.raises(ValueError, match="cost"):
        sk.sinkhorn(a, a, torch.rand(3, 4), backend="cpp")


def _solve_samples():
    # shared and per-row costs, both dtypes, a tolerance or none, each method, odd sizes
    for dtype in (torch.float32, torch.float64):
        for B, m, n, per_row in ((3, 4, 5, False), (1, 1, 7, False), (2, 6, 3, True)):
            a, b = _marginals(B, m, dtype), _marginals(B, n, dtype)
            M = _cost(B, m, n, 1.0, dtype, per_row)
            for tol, method in ((-1.0, 0), (1e-3, 1), (1e-4, 2)):
                yield a, b, M, tol, method


def test_every_op_passes_opcheck():
    # schema, fake (meta) kernel against the real one, and AOT dispatch with dynamic shapes
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for a, b, M, tol, method in _solve_samples():
        torch.library.opcheck(torch.ops.selkd.sinkhorn_solve.default,
                              (a, b, M, 0.1, 10, tol, 2, method, RANGE), test_utils=utils)
        zs = torch.randn(a.shape[0], b.shape[1], dtype=a.dtype)
        zt = torch.randn(a.shape[0], a.shape[1], dtype=a.dtype)
        for tg in (True, False):
            torch.library.opcheck(torch.ops.selkd.sinkhorn_kd_forward.default,
                                  (zs, zt, M, 2.0, 0.1, 10, tol, 3, method, tg, RANGE),
                                  test_utils=utils)
        # an int result has no fake kernel (its value is data): traced code runs the torch
        # check instead (ops/sinkhorn/api.py), so only the schema is checked here
        for tol_m in (1e-5, 2e-2):
            torch.library.opcheck(torch.ops.selkd.marginal_flags.default, (a, b, tol_m),
                                  test_utils=("test_schema",))
    assert int(torch.ops.selkd.cpu_vector_bits()) in (0, 128, 256, 512)


def test_sharp_regime_stays_accurate_float32():
    # eps = 1e-3 with costs in [0, 10]: exp(-M/eps) underflows everywhere in float32; the
    # stabilised path must still agree with the float64 log-domain solution
    B, m, n = 3, 12, 9
    a, b = _marginals(B, m, torch.float64), _marginals(B, n, torch.float64)
    M = _cost(B, m, n, 10.0, torch.float64, False)
    want = ref.solve(a, b, M, eps=1e-3, n_iters=60)
    got = BE.solve(a.float(), b.float(), M.float(), eps=1e-3, n_iters=60, tol=None,
                   check_every=10)
    assert torch.isfinite(got.loss).all()
    torch.testing.assert_close(got.loss.double(), want.loss, rtol=1e-5, atol=1e-5)
    assert math.isfinite(got.alpha.abs().max().item())


# ---------------------------------------------------------------- marginal check
def _marginal_case(case, dtype):
    a, b = _marginals(5, 6, torch.float64), _marginals(5, 4, torch.float64)
    if case == "negative_a":
        a[2, 1] = -1e-3
    elif case == "negative_b":
        b[4, 0] = -0.5
    elif case == "unbalanced":
        b[3] *= 1.01
    elif case == "slightly_off":
        b[3] *= 1 + 1e-7                     # under the 1e-5 tolerance
    elif case == "nan_row":
        a[1, 2] = float("nan")
    elif case == "inf_row":
        b[0, 3] = float("inf")
    elif case == "nan_and_negative":
        a[1, 2] = float("nan")
        a[3, 0] = -0.1
    elif case == "nan_and_unbalanced":
        a[1, 2] = float("nan")
        b[4] *= 2
    return a.to(dtype), b.to(dtype)


def _check_outcome(a, b, be):
    from selkd_kernels.ops.sinkhorn.api import _check_marginals
    try:
        _check_marginals(a, b, be)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["ok", "negative_a", "negative_b", "unbalanced", "slightly_off",
                                  "nan_row", "inf_row", "nan_and_negative",
                                  "nan_and_unbalanced"])
def test_compiled_marginal_check_matches_torch(case, dtype):
    a, b = _marginal_case(case, dtype)
    assert BE.marginal_flags(a, b, tol=1e-5) is not None   # the compiled pass is what runs here
    want = _check_outcome(a, b, None)                   # the torch version
    assert _check_outcome(a, b, BE) == want
    expect_error = case in ("negative_a", "negative_b", "unbalanced", "nan_and_negative",
                            "nan_and_unbalanced")
    assert (want is not None) == expect_error
    # non-contiguous views go through the same pass
    at, bt = a.t().contiguous().t(), b.t().contiguous().t()
    assert _check_outcome(at, bt, BE) == want


def test_marginal_check_falls_back_for_half_inputs():
    a = _marginals(3, 4, torch.float32).half()
    assert BE.marginal_flags(a, a, tol=2e-2) is None
    assert BE.marginal_flags(a.float(), a.double(), tol=1e-5) is None


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_tiny_masses_in_float32_scaling_give_finite_loss(backend):
    # a positive mass far below the smallest normal float (softmax of logits 50 apart) makes the
    # scaling u = a / (K v) underflow to 0 in float32; the potentials must still be finite
    # (eps (log a - log Kv)) or the loss term alpha * r is -inf * 0 = NaN for finite inputs
    torch.manual_seed(1)
    z = 50 * torch.randn(7, 13)
    p = torch.softmax(z, -1)
    assert ((p > 0) & (p < 1e-40)).any(), "no subnormal mass: the test would not bite"
    M = torch.rand(13, 13)
    out = sk.sinkhorn(p, p, M, eps=0.5, n_iters=3, backend=backend)
    assert torch.isfinite(out.loss).all()
    want = ref.solve(p.double(), p.double(), M.double(), eps=0.5, n_iters=3)
    torch.testing.assert_close(out.loss.double(), want.loss, rtol=1e-5, atol=1e-6)
    zs = z.clone().requires_grad_(True)
    loss = sk.sinkhorn_kd_loss(zs, z, M, tau=1.0, eps=0.5, n_iters=3, reduction="none",
                               backend=backend)
    assert torch.isfinite(loss).all()
    g, = torch.autograd.grad(loss.sum(), zs)
    assert torch.isfinite(g).all()
