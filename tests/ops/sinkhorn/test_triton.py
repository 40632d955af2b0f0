"""Triton backend against the pure-PyTorch reference (docs/gpu.md, docs/ops/sinkhorn.md).

Without a GPU, conftest.py sets TRITON_INTERPRET=1 before anything imports Triton, so the kernels
run in Triton's interpreter on CPU tensors. The interpreter executes every block operation in
numpy, so problems here are small; the tiled paths (the many-classes products and the tiled
log-domain kernel) are reached with small tiles and a resident-size limit of 0 instead of large
class counts. Tests marked ``gpu`` run the compiled kernels at realistic sizes on CUDA.

Four kernels serve the solve and the fused KD forward (``KERNELS``): ``scaling`` (tensor-core
scaling iteration, one launch), ``gemm`` (one batched product per half-iteration), ``stabilized``
(absorption-stabilised scaling per row) and ``log`` (tiled log domain). Each is compared with the
reference on the same inputs and iteration count, at the per-dtype tolerances of tests/utils.py.
At eps = 1e-3 with costs up to 10 the potentials in units of eps reach ~1e4, where a float32 ulp
is ~1e-3: any float32 implementation carries a few 1e-5 relative error in the loss there (the
float32 reference too), so those cases are compared with the float64 reference at 1e-4.
"""
import math

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

import selkd_kernels as sk  # noqa: E402
from selkd_kernels.ops.sinkhorn import dispatch  # noqa: E402
from selkd_kernels.ops.sinkhorn import reference as ref  # noqa: E402
from tests.utils import TOL, assert_close, cost, logits, marginals, non_contiguous  # noqa: E402

try:
    from selkd_kernels.ops.sinkhorn import triton as tri
except ImportError as exc:  # pragma: no cover - only when Triton itself is broken
    pytest.skip(f"triton backend unavailable: {exc}", allow_module_level=True)

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
_ROOT = __file__.rsplit("/tests/", 1)[0]
BE = tri.BACKEND

# which kernel a method reaches, and the settings that make the tiled paths cheap to reach
KERNEL_METHOD = {"scaling": "standard", "gemm": "standard", "stabilized": "log", "log": "log"}


@pytest.fixture
def kernel(request, monkeypatch):
    """Force one kernel: returns the ``method`` that reaches it."""
    name = request.param
    if name in ("gemm", "log"):
        monkeypatch.setattr(tri, "RESIDENT_MAX_ELEMS", 0)
        monkeypatch.setattr(tri, "GEMM_TILES", {torch.float32: (16, 16, 16),
                                                torch.float64: (16, 16, 16)})
        monkeypatch.setattr(tri, "ROWS_TILE", 16)
        monkeypatch.setattr(tri, "LOG_TILES", (4, 8))
    return KERNEL_METHOD[name]


KERNELS = pytest.mark.parametrize("kernel", list(KERNEL_METHOD), indirect=True)


def _launched(p) -> set:
    return {s.config.name for s in tri.plan(p)}


def _tol(dtype, scale=1.0):
    t = TOL[torch.float64 if dtype == torch.float64 else torch.float32]
    s = max(1.0, scale)
    return dict(loss_rtol=t["loss_rtol"], loss_atol=t["loss_atol"] * s, pot=t["pot_atol"] * s,
                err_rtol=t["err_rtol"], err_atol=t["err_atol"], grad=t["grad_atol"] * s)


def _check_solve(out, want, t, iters=True):
    assert out.alpha.dtype == want.alpha.dtype
    if iters:
        assert torch.equal(out.iters.cpu(), want.iters.cpu()), (out.iters, want.iters)
    assert_close(out.loss, want.loss, rtol=t["loss_rtol"], atol=t["loss_atol"], name="loss")
    assert_close(out.alpha, want.alpha, atol=t["pot"], name="alpha")
    assert_close(out.beta, want.beta, atol=t["pot"], name="beta")
    assert_close(out.err, want.err, rtol=t["err_rtol"], atol=t["err_atol"], name="err")


def _solve(a, b, M, method, **kw):
    kw.setdefault("tol", None)
    kw.setdefault("check_every", 10)
    return BE.solve(a, b, M, method=method, **kw)


def _ref(a, b, M, method, **kw):
    cd = torch.float64 if torch.float64 in (a.dtype, b.dtype, M.dtype) else torch.float32
    kw.setdefault("tol", None)
    kw.setdefault("check_every", 10)
    return ref.solve(a.to(cd), b.to(cd), M.to(cd), method=method, **kw)


def _problem(B, m, n, dtype=torch.float32, *, zeros=False, scale=2.0, per_row=False, seed=0):
    a = marginals(B, m, dtype, seed=seed, zeros=zeros, device=DEV)
    b = marginals(B, n, dtype, seed=seed + 1, zeros=zeros, device=DEV)
    M = cost(m, n, dtype, seed=seed + 2, scale=scale, batch=B if per_row else None, device=DEV)
    return a, b, M


# ---------------------------------------------------------------------------------------------
# registry, device support, host side
# ---------------------------------------------------------------------------------------------

def test_registry_exposes_triton():
    be = dispatch.get_backend("triton", torch.device(DEV))
    assert be.name == "triton" and be is tri.BACKEND
    assert "triton" in sk.available_backends(DEV)


def test_cpu_support_follows_the_interpreter_flag(monkeypatch):
    # the kernels run on CPU tensors only if the flag was set when they were defined, and is set
    # now; on a machine with CUDA (flag unset at import) CPU tensors are never accepted
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert BE.supports(torch.device("cpu")) == tri._DEFINED_INTERPRETED
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not BE.supports(torch.device("cpu"))


def test_import_without_triton_raises_import_error(monkeypatch):
    import importlib
    import sys
    for name in ("triton", "triton.language"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "selkd_kernels.ops.sinkhorn.triton")
    with pytest.raises(ImportError):
        importlib.import_module("selkd_kernels.ops.sinkhorn.triton")


def test_plan_picks_the_kernel_of_each_problem_class():
    P = tri.Problem
    assert {"kernel-matrix", "scaling-resident", "stabilized"} <= _launched(P(256, 100, 100))
    assert "stabilized" not in _launched(P(256, 100, 100, method="standard"))
    assert _launched(P(256, 100, 100, method="log")) == {"scaled-cost", "stabilized"}
    assert _launched(P(4, 100, 100, shared=False)) == {"scaled-cost", "stabilized"}
    big = _launched(P(256, 1000, 1000))
    assert {"gemm-alpha", "gemm-beta", "log-streamed"} <= big and "gemm-check" not in big
    assert "gemm-check" in _launched(P(256, 1000, 1000, has_tol=True))
    assert _launched(P(2, 1000, 1000, shared=False)) == {"log-streamed"}


def test_no_host_to_device_tensor_per_call(monkeypatch):
    # scalars travel as kernel arguments: building a tensor from Python values (a blocking
    # host-to-device copy on a GPU) anywhere in a call is a regression
    a, b, M = _problem(2, 5, 6)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.tensor called during a Triton backend call")

    monkeypatch.setattr(torch, "tensor", refuse)
    for method in ("auto", "log"):
        BE.solve(a, b, M, eps=0.1, n_iters=2, tol=1e-3, check_every=1, method=method)


_DNS_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
from selkd_kernels.ops.sinkhorn import triton as T
P = T.Problem
steps = (T.plan(P(256, 1000, 1000, has_tol=True, kd=True)) + T.plan(P(256, 100, 100, kd=True,
         has_tol=True)) + T.plan(P(3, 100, 100, shared=False)) + T.plan(P(3, 1000, 1000,
         shared=False, kd=True)))
bad = []
for step in steps:
    fn = step.config.fn
    dns = {x if isinstance(x, str) else fn.arg_names[x] for x in fn.do_not_specialize}
    for i, name in enumerate(fn.arg_names):
        param = fn.params[i]
        if param.is_constexpr or name.endswith("_ptr") or param.annotation_type:
            continue
        if name not in dns:
            bad.append(fn.__name__ + "." + name)
print("specialised:", sorted(set(bad)))
"""


def test_every_runtime_int_is_not_specialised():
    # a new batch size, iteration count, check interval or stride must not recompile: every
    # integer argument of every kernel the backend launches is listed in do_not_specialize
    # (compiled kernels only: checked in a process without the interpreter flag)
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _DNS_SCRIPT], check=False, env=env,
                         capture_output=True, text=True, timeout=300, cwd=_ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "specialised: []" in res.stdout, res.stdout


# ---------------------------------------------------------------------------------------------
# solve
# ---------------------------------------------------------------------------------------------

@KERNELS
@pytest.mark.parametrize("B,m,n", [(3, 7, 13), (1, 1, 5), (2, 6, 1), (1, 1, 1)])
def test_solve_shapes_float32(kernel, B, m, n):
    a, b, M = _problem(B, m, n)
    out = _solve(a, b, M, kernel, eps=0.1, n_iters=8)
    _check_solve(out, _ref(a, b, M, kernel, eps=0.1, n_iters=8), _tol(torch.float32, 2.0))
    assert out.iters.dtype == torch.int32


@pytest.mark.parametrize("B,m,n", [(1, 1024, 3), (2, 3, 1024)])
def test_solve_many_classes_one_side(B, m, n):
    a, b, M = _problem(B, m, n, scale=1.0)
    for method in ("standard", "log"):
        out = _solve(a, b, M, method, eps=0.1, n_iters=4)
        _check_solve(out, _ref(a, b, M, method, eps=0.1, n_iters=4), _tol(torch.float32))


@pytest.mark.parametrize("eps", [1e-3, 1e-2, 0.1, 1.0])
def test_solve_eps_range_float32(eps):
    # cost in [0, 10]: method="auto" takes the scaling kernel at eps = 1 and the stabilised one
    # below; exp(-M/eps) underflows in float32 from eps ~ 0.1 down, the kernels must not
    a, b, M = _problem(3, 9, 11, scale=10.0)
    out = _solve(a, b, M, "auto", eps=eps, n_iters=30)
    exact = _ref(a.double(), b.double(), M.double(), "auto", eps=eps, n_iters=30)
    assert torch.isfinite(out.loss).all()
    rtol = 1e-5 if eps >= 1e-2 else 1e-4
    assert_close(out.loss, exact.loss, rtol=rtol, atol=rtol, name="loss vs float64")
    if eps >= 1e-2:
        _check_solve(out, _ref(a, b, M, "auto", eps=eps, n_iters=30), _tol(torch.float32, 10.0))


@KERNELS
def test_solve_float64(kernel):
    a, b, M = _problem(2, 7, 13, torch.float64, scale=10.0)
    eps = 0.5 if kernel == "standard" else 1e-3
    out = _solve(a, b, M, kernel, eps=eps, n_iters=10)
    assert out.loss.dtype == torch.float64
    _check_solve(out, _ref(a, b, M, kernel, eps=eps, n_iters=10), _tol(torch.float64, 10.0))


@pytest.mark.parametrize("method", ["standard", "log"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_solve_half_inputs(method, dtype):
    a, b, M = _problem(3, 7, 13, dtype)
    out = _solve(a, b, M, method, eps=0.1, n_iters=20)
    assert out.loss.dtype == torch.float32  # accumulation in float32, not in the input dtype
    # same rounded inputs on both sides: float32 agreement
    _check_solve(out, _ref(a.float(), b.float(), M.float(), method, eps=0.1, n_iters=20),
                 _tol(torch.float32, 2.0))


@pytest.mark.parametrize("kernel", ["stabilized", "log"], indirect=True)
def test_solve_per_row_cost(kernel):
    a, b, M = _problem(3, 7, 13, per_row=True, scale=3.0)
    out = _solve(a, b, M, "auto", eps=0.05, n_iters=10)
    _check_solve(out, _ref(a, b, M, "auto", eps=0.05, n_iters=10), _tol(torch.float32, 3.0))


@KERNELS
def test_solve_non_contiguous(kernel):
    a, b, M = _problem(3, 7, 13)
    a2, b2, M2 = non_contiguous(a), non_contiguous(b), non_contiguous(M)
    assert not (a2.is_contiguous() or b2.is_contiguous() or M2.is_contiguous())
    out = _solve(a2, b2, M2, kernel, eps=0.1, n_iters=8)
    _check_solve(out, _ref(a, b, M, kernel, eps=0.1, n_iters=8), _tol(torch.float32, 2.0))


@KERNELS
def test_solve_zero_marginal_entries(kernel):
    a, b, M = _problem(3, 7, 13, zeros=True)
    out = _solve(a, b, M, kernel, eps=0.05, n_iters=10)
    want = _ref(a, b, M, kernel, eps=0.05, n_iters=10)
    assert torch.isfinite(out.loss).all() and torch.isfinite(out.err).all()
    assert torch.equal(torch.isneginf(out.alpha), a == 0)
    assert torch.equal(torch.isneginf(out.beta), b == 0)
    _check_solve(out, want, _tol(torch.float32, 2.0))


def test_solve_subnormal_mass_keeps_a_finite_potential():
    # a positive mass far below float32's normal range: potentials from the last denominators,
    # eps (log a - log s), stay finite where log(a / s) would be -inf
    a, b, M = _problem(2, 6, 7, torch.float64)
    a[0, 2] = 1e-41
    a = (a / a.sum(-1, keepdim=True)).float()
    b = b.float()
    M = M.float()
    for method in ("standard", "log"):
        out = _solve(a, b, M, method, eps=0.1, n_iters=10)
        want = _ref(a, b, M, method, eps=0.1, n_iters=10)
        assert torch.isfinite(out.alpha[0, 2]) and torch.isfinite(out.loss).all()
        assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-5, name="loss")


@pytest.mark.parametrize("kernel,check_every,n_iters", [
    ("scaling", 1, 40), ("scaling", 3, 40), ("scaling", 10, 40), ("stabilized", 1, 40),
    ("stabilized", 7, 40), ("gemm", 3, 20), ("log", 3, 20)], indirect=["kernel"])
def test_early_stopping_matches_reference(kernel, check_every, n_iters):
    # rows of very different difficulty: flat, peaked, and one that cannot reach tol in time
    a, b, M = _problem(4, 7, 13)
    a[2] = torch.softmax(6 * torch.randn(7, dtype=torch.float64, generator=torch.Generator()
                                          .manual_seed(5)), -1).to(a)
    kw = dict(eps=0.1, n_iters=n_iters, tol=1e-4, check_every=check_every)
    out = _solve(a, b, M, kernel, **kw)
    want = _ref(a, b, M, kernel, **kw)
    assert len(set(want.iters.tolist())) > 1  # the rows really stopped at different times
    _check_solve(out, want, _tol(torch.float32, 2.0))
    stopped = out.iters < n_iters
    assert stopped.any() and (out.err[stopped] <= 1e-4).all()


@KERNELS
def test_nan_and_inf_inputs_give_nan(kernel):
    a, b, M = _problem(4, 7, 13)
    a[1, 2] = float("nan")
    b[2, 0] = float("inf")
    out = _solve(a, b, M, kernel, eps=0.1, n_iters=6, tol=1e-3, check_every=3)
    assert torch.isnan(out.loss[1:3]).all() and torch.isnan(out.err[1:3]).all()
    want = _ref(a, b, M, kernel, eps=0.1, n_iters=6, tol=1e-3, check_every=3)
    assert_close(out.loss[[0, 3]], want.loss[[0, 3]], rtol=1e-5, atol=1e-5, name="healthy rows")
    M[3, 5] = float("nan")
    out = _solve(a, b, M, kernel, eps=0.1, n_iters=3)
    assert torch.isnan(out.loss).all() and torch.isnan(out.err).all()


def _assert_nan_rows(out, rows, fields):
    for name in fields:
        x = getattr(out, name)[rows]
        assert torch.isnan(x).all(), f"{name} of the bad rows {rows} is not all NaN: {x}"


@KERNELS
def test_bad_rows_report_nan_potentials(kernel):
    """A row with a NaN or inf input reports NaN loss, error and potentials in every entry, as
    the reference does (its bad-row rule), and runs all iterations; the other rows are the
    reference's."""
    a, b, M = _problem(4, 7, 13)
    a[1, 2] = float("nan")
    b[2, 0] = float("inf")
    kw = dict(eps=0.1, n_iters=12, tol=1e-3, check_every=3)
    out = _solve(a, b, M, kernel, **kw)
    _assert_nan_rows(out, [1, 2], ("loss", "err", "alpha", "beta"))
    assert (out.iters[[1, 2]] == 12).all()
    want = _ref(a, b, M, kernel, **kw)
    good = [0, 3]
    assert torch.isfinite(out.alpha[good]).all() and torch.isfinite(out.beta[good]).all()
    assert torch.equal(out.iters[good].cpu(), want.iters[good].cpu())
    assert_close(out.alpha[good], want.alpha[good], atol=1e-5, name="healthy alpha")
    assert_close(out.beta[good], want.beta[good], atol=1e-5, name="healthy beta")


@pytest.mark.parametrize("kernel", ["stabilized", "log"], indirect=True)
def test_bad_per_row_cost_gives_nan_potentials_of_its_row_only(kernel):
    a, b, M = _problem(3, 5, 6, per_row=True)
    M[0, 1, 1] = float("inf")
    M[2, 4, 0] = float("nan")
    out = _solve(a, b, M, "auto", eps=0.5, n_iters=3)
    _assert_nan_rows(out, [0, 2], ("loss", "err", "alpha", "beta"))
    want = _ref(a, b, M, "auto", eps=0.5, n_iters=3)
    assert_close(out.loss[1:2], want.loss[1:2], rtol=1e-5, atol=1e-5, name="healthy loss")
    assert_close(out.alpha[1:2], want.alpha[1:2], atol=1e-5, name="healthy alpha")
    assert_close(out.beta[1:2], want.beta[1:2], atol=1e-5, name="healthy beta")


def test_public_sinkhorn_api():
    a, b, M = _problem(3, 7, 13)
    r = sk.sinkhorn(a, b, M, eps=0.1, n_iters=30, tol=1e-5, backend="triton")
    assert r.backend == "triton"
    w = sk.sinkhorn(a, b, M, eps=0.1, n_iters=30, tol=1e-5, backend="torch")
    assert torch.equal(r.iters, w.iters)
    assert_close(r.loss, w.loss, rtol=1e-5, atol=1e-5, name="loss")


# ---------------------------------------------------------------------------------------------
# precision of the tensor-core products
# ---------------------------------------------------------------------------------------------

def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _emulated_standard(a, b, M, eps, n_iters, product):
    """The reference's standard-domain solve with every matrix product done by ``product``."""
    K = torch.exp(-(M - M.min()) / eps)
    u, v = torch.ones_like(a), torch.ones_like(b)
    for _ in range(n_iters):
        s = product(v, K.T)
        u = a / s
        c = product(u, K)
        v = b / c
    r = u * product(v, K.T)
    alpha = eps * (torch.log(a) - torch.log(s)) + M.min()
    beta = eps * (torch.log(b) - torch.log(c))
    return (alpha * r).sum(-1) + (beta * b).sum(-1) - eps * r.sum(-1)


def test_precision_choice_tf32x3_meets_float32_tolerance_plain_tf32_does_not():
    # why the kernels split operands (docs/gpu.md): one TF32 product per matrix product (what
    # Triton's default input_precision gives for float32) misses the 1e-5 loss tolerance; the
    # three-product split meets it
    a, b, M = (x.float() for x in _problem(64, 100, 100, torch.float64, scale=1.0))
    exact = ref.solve(a.double(), b.double(), M.double(), eps=0.1, n_iters=50,
                      method="standard").loss

    def tf32(x, w):
        return _round_tf32(x) @ _round_tf32(w)

    def tf32x3(x, w):
        xh, wh = _round_tf32(x), _round_tf32(w)
        xl, wl = _round_tf32(x - xh), _round_tf32(w - wh)
        return xl @ wh + xh @ wl + xh @ wh

    err = {}
    for name, prod in (("tf32", tf32), ("tf32x3", tf32x3)):
        loss = _emulated_standard(a, b, M, 0.1, 50, prod).double()
        err[name] = float(((loss - exact).abs() / exact.abs()).max())
    assert err["tf32x3"] <= 1e-5 < err["tf32"], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dot_precision_reaches_the_kernel(monkeypatch, dtype):
    # the interpreter multiplies exactly, so only the operands can show the precision: record
    # every dot the scaling kernel runs; float32 ones are TF32 products of TF32-exact operands
    # (three per step), float64 ones are "ieee"
    if not tri.interpreting():
        pytest.skip("inspects the interpreter's dots")
    from triton.runtime import interpreter
    seen = []
    orig = interpreter.InterpreterBuilder.create_dot

    def spy(self, a, b, d, input_precision, max_num_imprecise_acc):
        seen.append((input_precision, a.data.copy(), b.data.copy()))
        return orig(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", spy)
    a, b, M = _problem(2, 5, 6, dtype)
    BE.solve(a, b, M, eps=0.2, n_iters=2, tol=None, check_every=10, method="standard")
    assert seen
    if dtype == torch.float32:
        assert len(seen) % 3 == 0
    from triton._C.libtriton import ir
    want = ir.INPUT_PRECISION.TF32 if dtype == torch.float32 else ir.INPUT_PRECISION.IEEE
    assert all(p == want for p, _, _ in seen)
    if dtype == torch.float32:
        for _, x, w in seen:
            for arr in (x, w):
                assert not (np.ascontiguousarray(arr).view(np.uint32) & 0x1FFF).any()


def test_compiled_scaling_kernel_uses_three_tf32_products_per_step():
    # the same in the compiled kernel: TTIR of the resident kernel for sm_90, no GPU needed
    import os
    import subprocess
    import sys
    code = (
        "import os\nos.environ.pop('TRITON_INTERPRET', None)\n"
        "from triton.backends.compiler import GPUTarget\nimport triton, torch\n"
        "from triton.compiler import ASTSource\n"
        "import sys; sys.path.insert(0, 'benchmarks')\nimport triton_report as R\n"
        "from selkd_kernels.ops.sinkhorn import triton as T\n"
        "step = [s for s in T.plan(T.Problem(32, 16, 16, method='standard'))"
        " if s.config.name == 'scaling-resident'][0]\n"
        "c = step.config\n"
        "sig = R.signature(c.fn, c.consts, torch.float32, torch.float32)\n"
        "k = triton.compile(ASTSource(c.fn, sig, constexprs=c.consts), "
        "target=GPUTarget('cuda', 90, 64), options=dict(num_warps=c.num_warps))\n"
        "ttir = k.asm['ttir']\n"
        "dots = [l for l in ttir.splitlines() if 'tt.dot' in l]\n"
        "print(len(dots), sum('inputPrecision = tf32' in l for l in dots), "
        "ttir.count('-8192'))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True,
                         text=True,
                         timeout=600, cwd=_ROOT)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("no ptxas in this Triton install")
    assert res.returncode == 0, res.stderr[-3000:]
    dots, tf32, masks = (int(x) for x in res.stdout.split()[-3:])
    # three products per contraction step (x_lo w_hi, x_hi w_lo, x_hi w_hi), all TF32, and the
    # rounding of the operand to TF32 (bits & 0xFFFFE000 = -8192) in the kernel
    assert dots >= 6 and dots % 3 == 0 and tf32 == dots and masks >= 1, res.stdout


# ---------------------------------------------------------------------------------------------
# fused KD forward and gradients
# ---------------------------------------------------------------------------------------------

def _check_kd(out, want, t):
    assert torch.equal(out.iters.cpu(), want.iters.cpu())
    assert_close(out.loss, want.loss, rtol=t["loss_rtol"], atol=t["loss_atol"], name="loss")
    assert_close(out.grad_student, want.grad_student, atol=t["grad"], name="grad_student")
    if want.grad_teacher is not None:
        assert_close(out.grad_teacher, want.grad_teacher, atol=t["grad"], name="grad_teacher")
    else:
        assert out.grad_teacher is None
    assert_close(out.alpha, want.alpha, atol=t["pot"], name="alpha")
    assert_close(out.beta, want.beta, atol=t["pot"], name="beta")


@KERNELS
@pytest.mark.parametrize("B,m,n,teacher_grad", [(3, 7, 13, True), (1, 1, 6, True),
                                                (2, 5, 1, False)])
def test_kd_forward_float32(kernel, B, m, n, teacher_grad):
    zs, zt = logits(B, n, torch.float32, device=DEV), logits(B, m, torch.float32, seed=3,
                                                             device=DEV)
    M = cost(m, n, torch.float32, scale=2.0, device=DEV)
    kw = dict(tau=2.0, eps=0.1, n_iters=8, tol=None, check_every=10, teacher_grad=teacher_grad,
              method=kernel)
    _check_kd(BE.kd_forward(zs, zt, M, **kw), ref.kd_forward(zs, zt, M, **kw),
              _tol(torch.float32, 2.0))


@pytest.mark.parametrize("eps", [1e-3, 1.0])
def test_kd_forward_eps_extremes(eps):
    zs, zt = logits(3, 11, device=DEV).float(), logits(3, 9, seed=3, device=DEV).float()
    M = cost(9, 11, torch.float32, scale=10.0, device=DEV)
    kw = dict(tau=1.0, eps=eps, n_iters=20, tol=None, check_every=10, teacher_grad=True)
    out = BE.kd_forward(zs, zt, M, **kw)
    exact = ref.kd_forward(zs.double(), zt.double(), M.double(), **kw)
    rtol = 1e-5 if eps >= 1e-2 else 1e-4
    assert_close(out.loss, exact.loss, rtol=rtol, atol=rtol, name="loss vs float64")
    assert_close(out.grad_student, exact.grad_student, atol=1e-4, name="grad_student")


@KERNELS
def test_kd_forward_float64_tol(kernel):
    zs = logits(2, 13, torch.float64, device=DEV)
    zt = logits(2, 7, torch.float64, seed=3, device=DEV)
    M = cost(7, 13, torch.float64, scale=2.0, device=DEV)
    kw = dict(tau=3.0, eps=0.1, n_iters=20, tol=1e-5, check_every=4, teacher_grad=True,
              method=kernel)
    out = BE.kd_forward(zs, zt, M, **kw)
    assert out.grad_student.dtype == torch.float64
    _check_kd(out, ref.kd_forward(zs, zt, M, **kw), _tol(torch.float64, 2.0))


@pytest.mark.parametrize("kernel", ["stabilized", "log"], indirect=True)
def test_kd_forward_per_row_cost(kernel):
    zs, zt = logits(2, 13, device=DEV).float(), logits(2, 7, seed=3, device=DEV).float()
    M = cost(7, 13, torch.float32, scale=2.0, batch=2, device=DEV)
    kw = dict(tau=3.0, eps=0.1, n_iters=10, tol=None, check_every=10, teacher_grad=True)
    _check_kd(BE.kd_forward(zs, zt, M, **kw), ref.kd_forward(zs, zt, M, **kw),
              _tol(torch.float32, 2.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kd_forward_half_logits(dtype):
    zs, zt = logits(3, 13, dtype, device=DEV), logits(3, 7, dtype, seed=3, device=DEV)
    M = cost(7, 13, dtype, scale=2.0, device=DEV)
    kw = dict(tau=3.0, eps=0.1, n_iters=20, tol=None, check_every=10, teacher_grad=True)
    out = BE.kd_forward(zs, zt, M, **kw)
    assert out.loss.dtype == torch.float32
    _check_kd(out, ref.kd_forward(zs.float(), zt.float(), M.float(), **kw),
              _tol(torch.float32, 2.0))


@KERNELS
def test_kd_forward_masked_and_nan_logits(kernel):
    zs, zt = logits(4, 13, torch.float32, device=DEV), logits(4, 7, torch.float32, seed=3,
                                                               device=DEV)
    zt[0, 3] = float("-inf")   # a class the teacher rules out: p_T = 0 there
    zs[1, :4] = float("-inf")
    zs[2, 5] = float("nan")
    zt[3, 0] = float("inf")
    M = cost(7, 13, torch.float32, scale=2.0, device=DEV)
    kw = dict(tau=2.0, eps=0.1, n_iters=6, tol=None, check_every=10, teacher_grad=True,
              method=kernel)
    out = BE.kd_forward(zs, zt, M, **kw)
    want = ref.kd_forward(zs, zt, M, **kw)
    assert torch.isnan(out.loss[2:]).all() and torch.isnan(out.err[2:]).all()
    _assert_nan_rows(out, [2, 3], ("alpha", "beta", "grad_student", "grad_teacher"))
    assert torch.isfinite(out.loss[:2]).all()
    assert_close(out.loss[:2], want.loss[:2], rtol=1e-5, atol=1e-5, name="loss")
    assert_close(out.grad_student[:2], want.grad_student[:2], atol=1e-5, name="grad_student")
    assert_close(out.grad_teacher[:2], want.grad_teacher[:2], atol=1e-5, name="grad_teacher")
    assert out.grad_teacher[0, 3] == 0 and (out.grad_student[1, :4] == 0).all()


@pytest.mark.parametrize("kernel,shared", [("scaling", True), ("stabilized", False),
                                           ("gemm", True)], indirect=["kernel"])
def test_kd_loss_autograd_matches_torch_backend(kernel, shared):
    B, m, n = 2, 7, 13
    zs0 = logits(B, n, torch.float32, device=DEV)
    zt0 = logits(B, m, torch.float32, seed=3, device=DEV)
    M0 = cost(m, n, torch.float32, scale=2.0, batch=None if shared else B, device=DEV)
    grads = {}
    for backend in ("triton", "torch"):
        zs, zt, M = (x.clone().requires_grad_() for x in (zs0, zt0, M0))
        loss = sk.sinkhorn_kd_loss(zs, zt, M, tau=2.0, eps=0.1, n_iters=15, tol=1e-5,
                                   backend=backend, method=kernel)
        (2.5 * loss).backward()
        grads[backend] = (loss.detach(), zs.grad, zt.grad, M.grad)
    got, want = grads["triton"], grads["torch"]
    assert_close(got[0], want[0], rtol=1e-5, atol=1e-5, name="loss")
    for name, x, y in zip(("student", "teacher", "cost"), got[1:], want[1:]):
        assert_close(x, y, rtol=1e-4, atol=1e-6, name=f"grad {name}")


def test_tiling_boundaries_are_invisible(monkeypatch):
    # 12 x 24 classes through the tiled kernels with tiles that divide them and tiles that
    # leave ragged edges: the same numbers as the resident kernels
    zs, zt = logits(2, 24, torch.float32, device=DEV), logits(2, 12, torch.float32, seed=3,
                                                               device=DEV)
    M = cost(12, 24, torch.float32, scale=2.0, device=DEV)
    kw = dict(tau=2.0, eps=0.1, n_iters=5, tol=None, check_every=10, teacher_grad=True)
    resident = {meth: BE.kd_forward(zs, zt, M, method=meth, **kw) for meth in ("standard", "log")}
    monkeypatch.setattr(tri, "RESIDENT_MAX_ELEMS", 0)
    monkeypatch.setattr(tri, "ROWS_TILE", 16)
    for tiles in ((16, 16, 16), (16, 32, 16)):
        monkeypatch.setattr(tri, "GEMM_TILES", {torch.float32: tiles})
        out = BE.kd_forward(zs, zt, M, method="standard", **kw)
        assert_close(out.loss, resident["standard"].loss, rtol=1e-6, atol=1e-6, name="loss")
        assert_close(out.grad_student, resident["standard"].grad_student, atol=1e-7, name="gs")
    for tiles in ((4, 8), (8, 16), (16, 32)):
        monkeypatch.setattr(tri, "LOG_TILES", tiles)
        out = BE.kd_forward(zs, zt, M, method="log", **kw)
        assert_close(out.loss, resident["log"].loss, rtol=1e-6, atol=1e-6, name="loss")
        assert_close(out.grad_student, resident["log"].grad_student, atol=1e-7, name="gs")


# ---------------------------------------------------------------------------------------------
# GPU: compiled kernels at realistic sizes (skipped without CUDA)
# ---------------------------------------------------------------------------------------------

def _gpu_workload(B, m, n, dtype=torch.float32, seed=0):
    from selkd_kernels.benchmarking.workloads import Workload, make_ot_inputs
    w = Workload("gpu-test", "ot", B, m, n, 0.1, 10)
    inp = make_ot_inputs(w, "cuda", dtype, seed)
    return inp.student_logits, inp.teacher_logits, inp.cost


@pytest.mark.gpu
@pytest.mark.parametrize("B,m,n,eps,iters", [(4096, 100, 100, 0.1, 50), (256, 100, 100, 0.01, 200),
                                             (256, 1000, 1000, 0.1, 50), (256, 100, 100, 0.1, 50)])
def test_gpu_canonical_workloads(B, m, n, eps, iters):
    zs, zt, M = _gpu_workload(B, m, n)
    kw = dict(tau=3.0, eps=eps, n_iters=iters, tol=None, check_every=10, teacher_grad=True)
    out = BE.kd_forward(zs, zt, M, **kw)
    want = ref.kd_forward(zs.double(), zt.double(), M.double(), **kw)
    assert_close(out.loss, want.loss, rtol=1e-4, atol=1e-6, name="loss")
    assert_close(out.grad_student, want.grad_student, atol=1e-5, name="grad_student")
    assert_close(out.grad_teacher, want.grad_teacher, atol=1e-5, name="grad_teacher")
    assert (out.iters == iters).all()


@pytest.mark.gpu
@pytest.mark.parametrize("m,n", [(100, 100), (1000, 1000)])
@pytest.mark.parametrize("method", ["standard", "log"])
def test_gpu_early_stopping_and_float64(m, n, method):
    a = torch.softmax(2 * torch.randn(64, m, device="cuda", dtype=torch.float64), -1)
    b = torch.softmax(2 * torch.randn(64, n, device="cuda", dtype=torch.float64), -1)
    M = torch.rand(m, n, device="cuda", dtype=torch.float64)
    kw = dict(eps=0.05, n_iters=300, tol=1e-8, check_every=5, method=method)
    out = BE.solve(a, b, M, **kw)
    want = ref.solve(a, b, M, **kw)
    assert torch.equal(out.iters, want.iters)
    assert_close(out.loss, want.loss, rtol=1e-10, atol=1e-12, name="loss")
    for dt in (torch.float32, torch.bfloat16):
        out = BE.solve(a.to(dt), b.to(dt), M.to(dt), **kw)
        want = ref.solve(a.to(dt).float(), b.to(dt).float(), M.to(dt).float(), **kw)
        assert_close(out.loss, want.loss, rtol=1e-4, atol=1e-6, name=f"loss {dt}")


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,eps", [(100, 100, 0.1), (100, 100, 0.01), (1000, 1000, 0.1)])
def test_gpu_cuda_graph_capture_and_replay(m, n, eps):
    zs, zt, M = _gpu_workload(64, m, n)
    kw = dict(tau=3.0, eps=eps, n_iters=20, tol=1e-6, check_every=5, teacher_grad=True)
    BE.kd_forward(zs, zt, M, **kw)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = BE.kd_forward(zs, zt, M, **kw)
    zs2 = zs + 0.5 * torch.randn_like(zs)
    zs.copy_(zs2)
    graph.replay()
    torch.cuda.synchronize()
    want = ref.kd_forward(zs2, zt, M, **kw)
    assert torch.equal(out.iters, want.iters)
    assert_close(out.loss, want.loss, rtol=1e-4, atol=1e-6, name="replayed loss")


@pytest.mark.gpu
def test_gpu_new_batch_size_and_iterations_do_not_recompile():
    zs, zt, M = _gpu_workload(300, 100, 100)
    kw = dict(tau=3.0, eps=0.1, tol=None, check_every=10, teacher_grad=False)
    BE.kd_forward(zs, zt, M, n_iters=10, **kw)
    steps = tri.plan(tri.problem_for(zt, zs, M, kd=True))
    dev = torch.cuda.current_device()

    def compiled():
        return {s.config.name: len(s.config.fn.device_caches[dev][0]) for s in steps}

    before = compiled()
    for B, iters in ((299, 11), (17, 30), (300, 7)):
        BE.kd_forward(zs[:B], zt[:B], M, n_iters=iters, **kw)
    after = compiled()
    assert after == before


@pytest.mark.gpu
def test_gpu_autograd_and_small_eps():
    zs, zt, M = _gpu_workload(256, 100, 100)
    M = (10 * M).requires_grad_()
    zs.requires_grad_()
    loss = sk.sinkhorn_kd_loss(zs, zt, M, tau=3.0, eps=1e-3, n_iters=100, backend="triton")
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(zs.grad).all() and torch.isfinite(M.grad).all()
    want = sk.sinkhorn_kd_loss(zs.detach(), zt, M.detach(), tau=3.0, eps=1e-3, n_iters=100,
                               backend="torch")
    assert abs(loss.item() - want.item()) <= 1e-4 * abs(want.item()) + 1e-6


# ---------------------------------------------------------------------------------------------
# compiled mode without a GPU: lower every kernel of the canonical plans to sm_90 machine code
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_kernels_lower_to_sm90_without_gpu():
    # the cifar configurations (resident scaling and stabilised kernels, the ones closest to the
    # register limit); `benchmarks/triton_report.py --check` compiles every workload's in CI
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "benchmarks/triton_report.py", "--check", "--quiet",
                          "--workloads", "cifar"], check=False, env=env, cwd=_ROOT,
                         capture_output=True, text=True, timeout=1200)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("no ptxas in this Triton install")
    assert "configurations compiled" in res.stderr, res.stderr[-3000:]
    spills = [line for line in res.stderr.splitlines() if "spills" in line]
    assert not spills, spills
