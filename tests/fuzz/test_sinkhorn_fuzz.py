"""Fuzzing ``sk.sinkhorn`` on the torch and cpp backends (Triton: tests/fuzz/test_triton_fuzz.py).

Every case is checked against the documented guarantees (docs/guarantees.md):

* finite inputs give a finite loss and error, potentials finite where the mass is positive and
  ``-inf`` where it is 0; rows whose a and b are all zero give loss 0, error 0;
* a row with a NaN or inf input gives NaN loss, error and potentials; a NaN or inf in a or b
  leaves every other row bit-identical;
* every backend agrees with the float64 reference on the same (rounded) inputs to the precision
  floor of its compute dtype, with the same per-row iteration counts;
* bad arguments raise ValueError whose message starts with the argument's name, never anything
  else.
"""
import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import selkd_kernels as sk
from selkd_kernels import _validation as V
from selkd_kernels.ops.sinkhorn.dispatch import REGISTRY
from tests.fuzz.strategies import budget, floor, ot_cases
from tests.utils import assert_close

warnings.filterwarnings("ignore", message="selkd_kernels")
BACKENDS = [name for name in ("torch", "cpp") if name in REGISTRY.available("cpu")]
# Multiples of the precision floor (strategies.floor) allowed. Measured over 2,000 cases of up to
# 6 rows and 20 classes: loss and error at most 0.9 floors, potentials at most 14 (they also
# carry eps * log of the smallest mass and accumulate rounding over the iterations).
LOSS_FLOORS, POT_FLOORS = 8, 60


def _solve(case, backend, dtype=None):
    a, b, M = (x if dtype is None else x.to(dtype) for x in (case.a, case.b, case.cost))
    return sk.sinkhorn(a, b, M, eps=case.eps, backend=backend, **case.opts)


def check_guarantees(case, r):
    """The value guarantees of one result, independent of any reference."""
    good = [i for i in range(case.a.shape[0]) if i not in case.bad_rows]
    for i in case.bad_rows:
        for x in (r.loss[i], r.err[i], r.alpha[i], r.beta[i]):
            assert torch.isnan(x).all(), f"row {i} has a NaN/inf input but {x} is not NaN"
    for i in good:
        assert torch.isfinite(r.loss[i]) and torch.isfinite(r.err[i]), f"row {i}: {r.loss[i]}"
        for pot, mass in ((r.alpha[i], case.a[i]), (r.beta[i], case.b[i])):
            assert torch.isfinite(pot[mass > 0]).all() and torch.isneginf(pot[mass == 0]).all()
    for i in case.empty_rows:
        assert r.loss[i] == 0 and r.err[i] == 0


def compare_with_reference(case, r, ref):
    """``r`` (any backend, any dtype) against the float64 reference ``ref`` on the same inputs."""
    cd = r.loss.dtype
    rel, scale = floor(cd, case.cost, case.eps, case.a, case.b)
    tol = LOSS_FLOORS * rel
    bad = set(case.bad_rows)
    for i in range(case.a.shape[0]):
        if i in bad:
            continue
        if int(r.iters[i]) != int(ref.iters[i]):
            # a row whose error is within rounding of tol may stop one check earlier or later
            near = case.opts["tol"] is not None and abs(float(ref.err[i]) - case.opts["tol"]) \
                <= tol * max(1.0, float(ref.err[i]))
            assert near, f"row {i}: {int(r.iters[i])} iterations vs {int(ref.iters[i])}"
            continue
        assert_close(r.loss[i], ref.loss[i], atol=tol * scale, rtol=tol, name=f"loss[{i}]")
        assert_close(r.err[i], ref.err[i], atol=tol, rtol=tol, name=f"err[{i}]")
        for name in ("alpha", "beta"):
            got, want = getattr(r, name)[i], getattr(ref, name)[i]
            fin = want[torch.isfinite(want)]
            pscale = max(scale, float(fin.abs().max())) if fin.numel() else scale
            assert_close(got, want, atol=POT_FLOORS * rel * pscale, name=f"{name}[{i}]")


def _check_backends(case):
    ref = _solve(case, "torch", torch.float64)
    for name in BACKENDS:
        r = _solve(case, name)
        assert r.backend == name and r.loss.dtype == V.compute_dtype(case.a)
        check_guarantees(case, r)
        compare_with_reference(case, r, ref)


@budget(500)
@given(case=ot_cases())
def test_backends_match_the_float64_reference(case):
    _check_backends(case)


@pytest.mark.slow
@budget(1500)
@given(case=ot_cases(max_b=8, max_k=40))
def test_backends_match_the_float64_reference_long(case):
    _check_backends(case)


@budget(150)
@given(case=ot_cases(bad=False), data=st.data())
def test_nan_in_one_row_leaves_the_others_bit_identical(case, data):
    B = case.a.shape[0]
    r0 = data.draw(st.integers(0, B - 1))
    which = data.draw(st.sampled_from(["a", "b"]))
    a, b = case.a.clone(), case.b.clone()
    x = a if which == "a" else b
    x[r0, data.draw(st.integers(0, x.shape[1] - 1))] = data.draw(
        st.sampled_from([math.nan, math.inf, -math.inf]))
    for name in BACKENDS:
        clean = _solve(case, name)
        dirty = sk.sinkhorn(a, b, case.cost, eps=case.eps, backend=name,
                            check_marginals=False, **case.opts)
        assert torch.isnan(dirty.loss[r0]) and torch.isnan(dirty.err[r0])
        keep = [i for i in range(B) if i != r0]
        for field in ("loss", "err", "alpha", "beta", "iters"):
            assert torch.equal(getattr(dirty, field)[keep], getattr(clean, field)[keep]), field


@budget(80)
@given(case=ot_cases(bad=False), data=st.data())
def test_invalid_marginals_raise_value_error(case, data):
    kind = data.draw(st.sampled_from(["neg_a", "neg_b", "unbalanced"]))
    a, b = case.a.clone(), case.b.clone()
    row = data.draw(st.integers(0, a.shape[0] - 1))
    if kind == "neg_a":
        a[row, data.draw(st.integers(0, a.shape[1] - 1))] = -0.5
        want = "a must be non-negative"
    elif kind == "neg_b":
        b[row, data.draw(st.integers(0, b.shape[1] - 1))] = -1e-3
        want = "b must be non-negative"
    else:
        b[row] = b[row] * 1.5 + (1.0 if float(b[row].sum()) == 0 else 0.0) / b.shape[1]
        want = "b must carry the same mass"
    for name in BACKENDS:
        with pytest.raises(ValueError, match=f"^{want}"):
            sk.sinkhorn(a, b, case.cost, eps=case.eps, backend=name, **case.opts)


# ---- bad arguments ------------------------------------------------------------------------------

_NOT_NUMBERS = st.sampled_from([None, "0.1", [0.1], True, 1j, torch.tensor(0.1)])
_BAD = {
    "eps": st.one_of(st.floats(max_value=0.0), st.sampled_from([math.nan, math.inf, 1e-45,
                                                               1e-25, 1e25, 1e300]),
                     _NOT_NUMBERS),
    "n_iters": st.one_of(st.integers(max_value=0), st.floats(allow_nan=True),
                         st.sampled_from([None, "5", True, 2.5])),
    "tol": st.one_of(st.floats(max_value=0.0), st.sampled_from([math.nan, math.inf, "1e-3",
                                                               True])),
    "check_every": st.one_of(st.integers(max_value=0), st.sampled_from([1.5, None, False])),
    "method": st.text(max_size=8).filter(lambda s: s not in ("auto", "log", "standard")),
    "backend": st.text(max_size=8).filter(lambda s: s not in ("auto", "torch", "cpp",
                                                              "triton")),
    "eps_scaling": st.one_of(st.floats().filter(lambda x: not 0 < x < 1),
                             _NOT_NUMBERS.filter(lambda x: x is not None)),  # None: the default
    "grad": st.text(max_size=8).filter(lambda s: s not in ("envelope", "unrolled")),
}


def _bad_tensor(data, name, a, b, M):
    x = {"a": a, "b": b, "cost": M}[name]
    kind = data.draw(st.sampled_from(["ndim", "int", "empty", "list", "meta", "shape", "bool"]))
    if kind == "ndim":
        return x.flatten() if x.dim() > 1 else x[None, None, None]
    if kind == "int":
        return x.long()
    if kind == "bool":
        return x > 0
    if kind == "empty":
        return x[:, :0]
    if kind == "list":
        return x.tolist()
    if kind == "meta":
        return x.to("meta")
    return torch.cat([x, x[..., :1]], -1)  # one class too many


@budget(300)
@given(case=ot_cases(bad=False), data=st.data())
def test_bad_arguments_raise_value_error_naming_the_argument(case, data):
    name = data.draw(st.sampled_from(sorted(_BAD) + ["a", "b", "cost"]))
    args = {"a": case.a, "b": case.b, "cost": case.cost}
    opts = dict(case.opts, eps=case.eps)
    if name in args:
        args[name] = _bad_tensor(data, name, **{"a": case.a, "b": case.b, "M": case.cost})
        # a class count that no longer matches may be reported on the cost, which must match both
        names = {name, "cost"} if name in ("a", "b") else {"cost", "a", "b"}
    else:
        opts[name] = data.draw(_BAD[name])
        names = {name}
        if name == "eps_scaling" and data.draw(st.booleans()):
            opts["eps_scaling"], opts["scaling_iters"], names = 0.5, 0, {"scaling_iters"}
    with pytest.raises(ValueError) as info:
        sk.sinkhorn(args["a"], args["b"], args["cost"], **opts)
    first = str(info.value).split(" ")[0]
    assert first in names, f"{name}: message {info.value!r} does not start with {names}"

