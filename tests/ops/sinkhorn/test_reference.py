"""The torch reference solver against POT, and its own invariants (docs/ops/sinkhorn.md).

POT runs in float64 on the float64 twin of each problem (tests/utils.py builds float64 and casts)
and its values are cached (tests/oracles.py), so the float32 and float64 variants of a case cost
one oracle call.
"""
import math

import numpy as np
import pytest
import torch

import selkd_kernels as sk
from selkd_kernels.ops.sinkhorn import reference as ref
from tests.oracles import pot_batch_losses
from tests.utils import assert_close, cost, non_contiguous, ot_problem


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    # this module tests the torch reference: "auto" must not route to a compiled backend
    monkeypatch.setenv("SELKD_BACKEND", "torch")


RTOL = {torch.float64: 1e-6, torch.float32: 1e-4}        # relative agreement with POT
SOLVER_TOL = {torch.float64: 1e-12, torch.float32: 1e-6}  # marginal L1 error to stop at

SHAPES = [(1, 1, 1), (1, 1, 5), (1, 6, 1), (3, 7, 13), (2, 31, 17), (1, 100, 3)]


def _assert_rel(x, expected, rtol):
    x = np.asarray(torch.as_tensor(x).double(), dtype=np.float64)
    err = np.abs(x - expected) / np.maximum(np.abs(expected), 1e-3)
    assert np.all(err <= rtol), f"relative errors {err} exceed {rtol}"


def _cast(dtype, *xs):
    return tuple(x.to(dtype) for x in xs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,m,n", SHAPES)
@pytest.mark.parametrize("eps", [1.0, 0.1, 0.01])
def test_loss_matches_pot(B, m, n, eps, dtype):
    a, b, M = ot_problem(B, m, n)
    want = pot_batch_losses(a, b, M, eps)
    r = sk.sinkhorn(*_cast(dtype, a, b, M), eps=eps, n_iters=5000, tol=SOLVER_TOL[dtype],
                    backend="torch")
    assert r.loss.dtype == dtype and r.alpha.shape == (B, m) and r.beta.shape == (B, n)
    _assert_rel(r.loss, want, RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps", [1e-2, 1e-3])
def test_small_eps_with_eps_scaling_matches_pot(eps, dtype):
    a, b, M = ot_problem(3, 5, 6, seed=3)
    r = sk.sinkhorn(*_cast(dtype, a, b, M), eps=eps, n_iters=20000, tol=SOLVER_TOL[dtype],
                    eps_scaling=0.5, backend="torch")
    _assert_rel(r.loss, pot_batch_losses(a, b, M, eps), RTOL[dtype])


def test_eps_1e3_cost_up_to_10_float64_accurate():
    a, b, M = ot_problem(2, 5, 6, scale=10.0, seed=4)
    r = sk.sinkhorn(a, b, M, eps=1e-3, n_iters=30000, tol=1e-12, eps_scaling=0.5)
    _assert_rel(r.loss, pot_batch_losses(a, b, M, 1e-3), 1e-6)


@pytest.mark.parametrize("method", ["auto", "log"])
@pytest.mark.parametrize("seed", [0, 3, 4])
def test_eps_1e3_cost_up_to_10_float32_within_documented_floor(method, seed):
    # standard-domain scaling would underflow here (exp(-10/1e-3) == 0 in any float); the
    # automatic choice must switch to log-domain updates. Float32 potentials at M/eps ~ 1e4 carry
    # ~1e-3 absolute error in eps units, so the marginal error floors near 1e-4 and the converged
    # loss agrees with float64 to ~1e-3 relative (docs/guarantees.md; measured over 40 rows:
    # median 3e-4, worst 7e-3 stopped at tol 5e-4). Unconverged runs are not a precision test.
    a, b, M = ot_problem(2, 5, 6, scale=10.0, seed=seed)
    a32, b32, M32 = _cast(torch.float32, a, b, M)
    r = sk.sinkhorn(a32, b32, M32, eps=1e-3, n_iters=30000, tol=5e-4, eps_scaling=0.5,
                    method=method)
    assert (r.err <= 5e-4).all(), "not converged: the comparison below would test nothing"
    _assert_rel(r.loss, pot_batch_losses(a, b, M, 1e-3), 1e-3)
    r_plain = sk.sinkhorn(a32, b32, M32, eps=1e-3, n_iters=300, method=method)
    assert torch.isfinite(r_plain.loss).all() and torch.isfinite(r_plain.alpha).all()


def test_auto_picks_log_when_standard_would_underflow():
    M = cost(4, 5, torch.float32, scale=10.0)
    assert ref.choose_method(M, 1e-3, torch.float32) == "log"
    assert ref.choose_method(M, 1.0, torch.float32) == "standard"
    assert ref.choose_method(M * 10, 1.0, torch.float64) == "standard"
    a, b, _ = ot_problem(2, 4, 5, torch.float32)
    with np.errstate(all="ignore"):
        bad = sk.sinkhorn(a, b, M, eps=1e-2, n_iters=50, method="standard", check_marginals=False)
    assert not torch.isfinite(bad.loss).all(), "standard domain should break down here"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_row_cost_matches_pot(dtype):
    a, b, M = ot_problem(3, 6, 4, per_row=True)
    want = pot_batch_losses(a, b, M, 0.1)
    a, b, M = _cast(dtype, a, b, M)
    r = sk.sinkhorn(a, b, M, eps=0.1, n_iters=5000, tol=SOLVER_TOL[dtype])
    _assert_rel(r.loss, want, RTOL[dtype])
    # each row equals the same problem solved alone with a shared cost
    for i in range(3):
        ri = sk.sinkhorn(a[i:i + 1], b[i:i + 1], M[i], eps=0.1, n_iters=5000,
                         tol=SOLVER_TOL[dtype])
        torch.testing.assert_close(ri.loss, r.loss[i:i + 1])


def _problem_with_zeros():
    a, b, M = ot_problem(3, 8, 6)
    a[0, [1, 4]] = 0
    a[2, 0] = 0
    b[1, [0, 5]] = 0
    return a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True), M


@pytest.mark.parametrize("method", ["log", "standard"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_entries_match_reduced_problem(method, dtype):
    a, b, M = _problem_with_zeros()
    want = pot_batch_losses(a, b, M, 0.1)
    a, b, M = _cast(dtype, a, b, M)
    r = sk.sinkhorn(a, b, M, eps=0.1, n_iters=5000, tol=SOLVER_TOL[dtype], method=method)
    assert torch.isfinite(r.loss).all()
    assert torch.isneginf(r.alpha[0, [1, 4]]).all() and torch.isneginf(r.beta[1, [0, 5]]).all()
    _assert_rel(r.loss, want, RTOL[dtype])


@pytest.mark.parametrize("method", ["log", "standard"])
@pytest.mark.parametrize("tol", [None, 1e-6])
def test_row_without_mass_has_loss_zero(method, tol):
    # T = 0 is the only plan of a row whose a and b are all zero: loss 0, error 0, potentials
    # -inf; the other rows are untouched
    a, b, M = ot_problem(3, 4, 5)
    a[1], b[1] = 0.0, 0.0
    r = sk.sinkhorn(a, b, M, eps=0.1, n_iters=35, tol=tol, method=method)
    assert r.loss[1] == 0 and r.err[1] == 0
    assert torch.isneginf(r.alpha[1]).all() and torch.isneginf(r.beta[1]).all()
    assert r.iters[1] == (10 if tol is not None else 35)  # frozen at the first check
    keep = [0, 2]
    alone = sk.sinkhorn(a[keep], b[keep], M, eps=0.1, n_iters=35, tol=tol, method=method)
    assert_close(r.loss[keep], alone.loss, rtol=1e-14, atol=1e-15, name="other rows")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_standard_and_log_domain_agree(dtype):
    a, b, M = ot_problem(5, 9, 11, dtype)
    for tol in (None, 1e-5):
        lg = sk.sinkhorn(a, b, M, eps=0.2, n_iters=37, tol=tol, method="log")
        st = sk.sinkhorn(a, b, M, eps=0.2, n_iters=37, tol=tol, method="standard")
        rtol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(st.loss, lg.loss, rtol=rtol, atol=rtol)
        torch.testing.assert_close(st.alpha - st.alpha[:, :1], lg.alpha - lg.alpha[:, :1],
                                   rtol=rtol * 10, atol=rtol * 10)
        assert torch.equal(st.iters, lg.iters)


def _converging_rows():
    a, b, M = ot_problem(6, 10, 10)
    a[0] = b[0]  # identical marginals converge faster than the rest
    return a, b, M


def test_per_row_early_stopping():
    a, b, M = _converging_rows()
    r = sk.sinkhorn(a, b, M, eps=0.1, n_iters=1000, tol=1e-9, check_every=7)
    it = r.iters.tolist()
    assert len(set(it)) > 1, "rows should stop at different iterations"
    for k, e in zip(it, r.err.tolist()):
        assert k % 7 == 0 or k == 1000
        assert k == 1000 or e <= 1e-9
    # frozen rows are exactly where they stopped: re-running with n_iters = their count matches
    for i, k in enumerate(it):
        ri = sk.sinkhorn(a[i:i + 1], b[i:i + 1], M, eps=0.1, n_iters=k)
        torch.testing.assert_close(ri.loss, r.loss[i:i + 1], rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", ["log", "standard"])
def test_loop_ends_once_every_row_is_frozen(method, monkeypatch):
    # n_iters = 10**6 would take minutes if the loop ran on after the last row froze; the values
    # and per-row counts are those of a run whose n_iters ends right after that check
    a, b, M = _converging_rows()
    steps = []
    real = ref._iterate

    def counting(step, *args):
        def counted(state):
            steps.append(1)
            return step(state)
        return real(counted, *args)

    monkeypatch.setattr(ref, "_iterate", counting)
    long = sk.sinkhorn(a, b, M, eps=0.1, n_iters=10 ** 6, tol=1e-9, check_every=7,
                       method=method)
    last = int(long.iters.max())
    assert len(steps) == last < 10 ** 6
    short = sk.sinkhorn(a, b, M, eps=0.1, n_iters=last + 7, tol=1e-9, check_every=7,
                        method=method)
    assert torch.equal(long.iters, short.iters) and torch.equal(long.loss, short.loss)
    assert torch.equal(long.alpha, short.alpha) and torch.equal(long.err, short.err)


def test_fixed_iterations_without_tol():
    a, b, M = ot_problem(3, 4, 5, torch.float32)
    r = sk.sinkhorn(a, b, M, eps=0.05, n_iters=13)
    assert r.iters.tolist() == [13, 13, 13] and r.iters.dtype == torch.int32
    assert (r.err > 1e-4).all() and r.backend == "torch"  # 13 iterations at eps=0.05: unconverged


def test_loss_is_primal_value_of_returned_plan():
    a, b, M = ot_problem(4, 6, 5)
    r = sk.sinkhorn(a, b, M, eps=0.3, n_iters=4, return_plan=True)  # far from converged
    T = r.plan
    torch.testing.assert_close(T.sum(1), b, rtol=1e-12, atol=1e-14)  # beta-update last
    torch.testing.assert_close((T.sum(2) - a).abs().sum(-1), r.err)
    H = -(T * (T.log() - 1)).sum((1, 2))
    torch.testing.assert_close(r.loss, (T * M).sum((1, 2)) - 0.3 * H)
    torch.testing.assert_close(sk.transport_plan(r, M, 0.3), T)


def test_converged_primal_equals_dual():
    a, b, M = ot_problem(3, 7, 9)
    r = sk.sinkhorn(a, b, M, eps=0.1, n_iters=5000, tol=1e-13)
    dual = (r.alpha * a).sum(-1) + (r.beta * b).sum(-1) - 0.1
    torch.testing.assert_close(r.loss, dual, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("method", ["log", "standard"])
@pytest.mark.parametrize("where", ["a", "b", "cost_nan", "cost_inf", "per_row_cost"])
def test_nan_or_inf_input_gives_nan_rows(where, method):
    a, b, M = ot_problem(3, 4, 5, torch.float32, per_row=where == "per_row_cost")
    clean = sk.sinkhorn(a, b, M, eps=0.1, n_iters=20, tol=1e-4, method=method)
    if where == "a":
        a[1, 2] = float("nan")
    elif where == "b":
        b[1, 0] = float("inf")
    elif where == "cost_nan":
        M[0, 0] = float("nan")
    elif where == "cost_inf":
        M[2, 3] = float("inf")
    else:
        M[1, 2, 3] = float("-inf")
    r = sk.sinkhorn(a, b, M, eps=0.1, n_iters=20, tol=1e-4, method=method,
                    check_marginals=False)
    bad = [1] if where in ("a", "b", "per_row_cost") else [0, 1, 2]
    good = [i for i in range(3) if i not in bad]
    for x in (r.loss[bad], r.err[bad], r.alpha[bad], r.beta[bad]):
        assert torch.isnan(x).all()
    assert (r.iters[bad] == 20).all()
    # the other rows are bit-identical to the run without the bad entry
    for x, y in ((r.loss, clean.loss), (r.alpha, clean.alpha), (r.iters, clean.iters)):
        assert torch.equal(x[good], y[good])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    # the rounded half values, solved in float64, are the exact answer for these inputs: a
    # computation in half precision would miss it by ~1e-3, float32 accumulation agrees to 1e-5
    a, b, M = ot_problem(2, 5, 7)
    ah, bh, Mh = _cast(dtype, a, b, M)
    r = sk.sinkhorn(ah, bh, Mh, eps=0.1, n_iters=200, tol=1e-6)
    assert r.loss.dtype == torch.float32 and r.alpha.dtype == torch.float32
    exact = sk.sinkhorn(ah.double(), bh.double(), Mh.double(), eps=0.1, n_iters=200, tol=1e-6,
                        check_marginals=False)
    assert_close(r.loss, exact.loss, rtol=1e-5, atol=1e-6, name="loss")


@pytest.mark.parametrize("per_row", [False, True])
def test_non_contiguous_inputs(per_row):
    a, b, M = ot_problem(4, 6, 5, per_row=per_row)
    r1 = sk.sinkhorn(non_contiguous(a), non_contiguous(b), non_contiguous(M), eps=0.1,
                     n_iters=50, method="log")
    r2 = sk.sinkhorn(a, b, M, eps=0.1, n_iters=50, method="log")
    torch.testing.assert_close(r1.loss, r2.loss, rtol=1e-14, atol=1e-15)


# ---- streaming: blocks of rows and classes -----------------------------------------------------

@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 60])
def test_blocked_log_domain_equals_one_block(per_row, chunk):
    # chunk = 1: one batch row and one class per block, even below one row's class count
    a, b, M = ot_problem(5, 9, 6, per_row=per_row, zeros=True)
    whole = ref.solve_log(a, b, M, eps=0.2, n_iters=23, tol=1e-8, check_every=4)
    blocked = ref.solve_log(a, b, M, eps=0.2, n_iters=23, tol=1e-8, check_every=4,
                            chunk_elems=chunk)
    for name in ("loss", "alpha", "beta", "err"):
        assert_close(getattr(blocked, name), getattr(whole, name), rtol=1e-15, atol=1e-15,
                     name=name)
    assert torch.equal(blocked.iters, whole.iters)
    scaled = [ref.solve(a, b, M, eps=0.01, n_iters=30, eps_scaling=0.5, chunk_elems=c)
              for c in (ref.CHUNK_ELEMS, chunk)]
    assert_close(scaled[1].loss, scaled[0].loss, rtol=1e-14, atol=1e-15, name="eps_scaling loss")


def test_blocks_never_exceed_chunk(monkeypatch):
    sizes = []
    real = ref._lse_block

    def spy(x, Ms, dim):
        sizes.append(x.shape[0] * Ms.shape[-2] * Ms.shape[-1])
        return real(x, Ms, dim)

    monkeypatch.setattr(ref, "_lse_block", spy)
    a, b, M = ot_problem(16, 12, 10)
    ref.solve_log(a, b, M, eps=0.2, n_iters=3, chunk_elems=250)
    assert sizes and max(sizes) <= 250
    sizes.clear()
    ref.solve_log(a, b, M, eps=0.2, n_iters=3)
    assert sizes == [16 * 12 * 10] * len(sizes)  # small problems: one block, as before


# ---- the plan-based cost gradient ----------------------------------------------------------------

def _plans(dtype, eps, zeros=False, scale=1.0):
    a, b, M = ot_problem(9, 4, 6, dtype, zeros=zeros, scale=scale)
    r = sk.sinkhorn(a, b, M, eps=eps, n_iters=30)
    return r, M


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("zeros", [False, True])
def test_plan_weighted_sum_equals_materialised_sum(dtype, zeros):
    r, M = _plans(dtype, 0.2, zeros)
    w = torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    full = (ref.transport_plan(r.alpha, r.beta, M, 0.2) * w.to(dtype)[:, None, None]).sum(0)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-7)
    gemm = ref.plan_weighted_sum(r.alpha, r.beta, M, 0.2, w)
    chunked = ref.plan_weighted_sum(r.alpha, r.beta, M, 0.2, w, chunk_elems=2 * 24,
                                    allow_gemm=False)
    assert_close(gemm, full, **tol, name="GEMM form")
    assert_close(chunked, full, **tol, name="chunked")
    assert ref._plan_weighted_sum_gemm(r.alpha, r.beta, M, 0.2, w.to(dtype)) is not None


def test_plan_weighted_sum_falls_back_where_exponentials_underflow():
    # (max M - min M)/eps = 1e3 in float32: K = exp(-M/eps) underflows, the GEMM form is refused
    r, M = _plans(torch.float32, 0.01, scale=10.0)
    w = torch.ones(9)
    assert ref._plan_weighted_sum_gemm(r.alpha, r.beta, M, 0.01, w) is None
    full = ref.transport_plan(r.alpha, r.beta, M, 0.01).sum(0)
    assert_close(ref.plan_weighted_sum(r.alpha, r.beta, M, 0.01, w), full, rtol=1e-6,
                 atol=1e-9)


def test_plan_weighted_sum_propagates_nan_rows():
    r, M = _plans(torch.float64, 0.2)
    alpha = r.alpha.clone()
    alpha[3] = float("nan")
    assert torch.isnan(ref.plan_weighted_sum(alpha, r.beta, M, 0.2, torch.ones(9))).all()


def test_plan_times_weights_per_row_cost():
    a, b, M = ot_problem(7, 3, 5, per_row=True)
    r = sk.sinkhorn(a, b, M, eps=0.2, n_iters=30)
    w = torch.linspace(-1, 2, 7, dtype=torch.float64)
    want = ref.transport_plan(r.alpha, r.beta, M, 0.2) * w[:, None, None]
    assert_close(ref.plan_times_weights(r.alpha, r.beta, M, 0.2, w, chunk_elems=20), want,
                 rtol=1e-15, atol=0)



@pytest.mark.parametrize("chunk", [1, 7, 13, 48, 10_000])
def test_plan_blocks_never_exceed_chunk_and_cover_the_plans(chunk):
    # chunk 7 and 13 split the class axis within a row (m n = 24), 48 groups rows, 1 gives
    # single plan rows (n = 6 entries: the smallest block there is)
    r, M = _plans(torch.float64, 0.2)
    w = torch.linspace(-1, 2, 9, dtype=torch.float64)
    seen = torch.zeros(9, 4, 6, dtype=torch.int64)
    for rows, cls, T in ref._plan_blocks(r.alpha, r.beta, M.unsqueeze(0), 0.2, chunk):
        assert T.numel() <= max(chunk, 6)
        seen[rows, cls] += 1
    assert (seen == 1).all()
    full = ref.transport_plan(r.alpha, r.beta, M, 0.2) * w[:, None, None]
    assert_close(ref.plan_weighted_sum(r.alpha, r.beta, M, 0.2, w, chunk_elems=chunk,
                                       allow_gemm=False), full.sum(0), rtol=1e-13, atol=1e-15)
    Mb = M.expand(9, 4, 6).contiguous()
    assert_close(ref.plan_times_weights(r.alpha, r.beta, Mb, 0.2, w, chunk_elems=chunk), full,
                 rtol=1e-15, atol=0)

# ---- eps-scaling schedule ----------------------------------------------------------------------

def test_eps_schedule_is_decreasing_and_ends_at_eps():
    M = torch.tensor([[0.0, 10.0]])
    s = ref.eps_schedule(M, 1e-3, 0.5)
    assert s[0] == 10.0 and s[-1] == 1e-3
    assert all(x > y for x, y in zip(s, s[1:]))
    assert len(s) == math.ceil(math.log(1e-3 / 10) / math.log(0.5)) + 1


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_eps_schedule_ignores_non_finite_costs(bad):
    M = torch.tensor([[0.0, 10.0, bad]])
    assert ref.eps_schedule(M, 1e-3, 0.5) == ref.eps_schedule(M[:, :2], 1e-3, 0.5)
    assert ref.eps_schedule(torch.full((2, 2), bad), 1e-3, 0.5) == [1e-3]


def test_eps_schedule_is_capped():
    M = torch.tensor([[0.0, 1e6]], dtype=torch.float64)
    s = ref.eps_schedule(M, 1e-6, 0.9999)  # would need ~276,000 stages
    assert len(s) == ref.MAX_SCALING_STAGES + 1 and s[-1] == 1e-6
    assert all(x > y for x, y in zip(s, s[1:]))


def test_eps_scaling_with_infinite_cost_returns_nan_promptly():
    # the repro: the schedule used to halve an infinite range forever
    a, b = torch.full((2, 3), 1 / 3), torch.full((2, 4), 0.25)
    M = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    M[1, 2] = math.inf
    r = sk.sinkhorn(a, b, M, eps=0.1, eps_scaling=0.5)
    stages = len(ref.eps_schedule(M, 0.1, 0.5)) - 1   # from the finite entries' range
    assert torch.isnan(r.loss).all() and (r.iters == 100 + 10 * stages).all()
    Mb = M.expand(2, 3, 4).clone()
    Mb[0] = M.nan_to_num(posinf=0.5)
    r = sk.sinkhorn(a, b, Mb, eps=0.1, eps_scaling=0.5)
    assert torch.isfinite(r.loss[0]) and torch.isnan(r.loss[1])
