"""Fuzzing the Sinkhorn KD loss and its gradients on the torch and cpp backends.

Guarantees asserted (docs/guarantees.md): a row with a NaN or inf logit has a NaN loss and NaN
gradients, the other rows finite ones; a -inf teacher logit is a zero probability, not an error;
loss rows and the gradients w.r.t. student logits, teacher logits and cost agree with the float64
reference on the same inputs to the precision floor; bad arguments raise ValueError whose message
starts with the argument's name.
"""
import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import selkd_kernels as sk
from selkd_kernels.ops.sinkhorn.dispatch import REGISTRY
from tests.fuzz.strategies import budget, floor, kd_cases
from tests.utils import assert_close

warnings.filterwarnings("ignore", message="selkd_kernels")
BACKENDS = [name for name in ("torch", "cpp") if name in REGISTRY.available("cpu")]
# Measured over 1,500 cases of up to 6 rows and 20 classes (in floors, strategies.floor): loss
# 0.85, cost gradient 0.8, logit gradients 5.9 (they divide potential errors by tau).
LOSS_FLOORS, GRAD_FLOORS = 8, 40


def run_kd(case, backend, dtype=None):
    """Loss rows, iteration counts and the gradients of ``sum_i w_i loss_i`` (w spans signs)."""
    xs = [(x if dtype is None else x.to(dtype)).clone().requires_grad_(True)
          for x in (case.zs, case.zt, case.cost)]
    rows, (iters, _) = sk.sinkhorn_kd_loss(*xs, tau=case.tau, eps=case.eps, reduction="none",
                                           backend=backend, return_stats=True, **case.opts)
    w = torch.linspace(-1.0, 1.5, rows.shape[0], dtype=rows.dtype)
    (rows * w).sum().backward()
    return rows.detach(), iters, [x.grad for x in xs]


def _check(case):
    ref_rows, ref_iters, ref_grads = run_kd(case, "torch", torch.float64)
    p_t = torch.softmax(case.zt.double() / case.tau, -1)
    p_s = torch.softmax(case.zs.double() / case.tau, -1)
    B = case.zs.shape[0]
    good = [i for i in range(B) if i not in case.bad_rows]
    for name in BACKENDS:
        rows, iters, grads = run_kd(case, name)
        assert rows.dtype == case.zs.dtype
        for i in case.bad_rows:
            # entries of probability exactly 0 (a -inf logit) receive 0, all others NaN
            for k, z in enumerate((case.zs, case.zt)):
                live = ~torch.isneginf(z[i])
                assert torch.isnan(grads[k][i][live]).all() and (grads[k][i][~live] == 0).all()
            assert torch.isnan(rows[i]), name
        for i in good:
            assert torch.isfinite(rows[i]) and torch.isfinite(grads[0][i]).all(), name
            assert torch.isfinite(grads[1][i]).all(), name
        rel, scale = floor(rows.dtype, case.cost, case.eps, p_t, p_s)
        for i in good:
            if int(iters[i]) != int(ref_iters[i]):
                assert case.opts["tol"] is not None, f"{name} row {i}: iterations differ"
                continue
            assert_close(rows[i], ref_rows[i], atol=LOSS_FLOORS * rel * scale,
                         rtol=LOSS_FLOORS * rel, name=f"{name} loss[{i}]")
            for k, what in enumerate(("student", "teacher")):
                assert_close(grads[k][i], ref_grads[k][i],
                             atol=GRAD_FLOORS * rel * scale / case.tau,
                             name=f"{name} d/d{what}[{i}]")
        if case.bad_rows:
            # a NaN row reaches every entry of a shared cost's gradient, its own of a per-row one
            gc = grads[2] if case.cost.dim() == 2 else grads[2][case.bad_rows]
            assert torch.isnan(gc).all(), name
        elif bool((iters == ref_iters).all()):
            want = ref_grads[2]
            assert_close(grads[2], want, atol=LOSS_FLOORS * rel * max(1.0, float(
                want.abs().max())), name=f"{name} d/dcost")


@budget(300)
@given(case=kd_cases())
def test_kd_loss_and_gradients_match_the_float64_reference(case):
    _check(case)


@pytest.mark.slow
@budget(1000)
@given(case=kd_cases(max_b=8, max_k=40))
def test_kd_loss_and_gradients_match_the_float64_reference_long(case):
    _check(case)


@budget(40)
@given(case=kd_cases(bad=False, dtypes=(torch.float16, torch.bfloat16)))
def test_half_logits_give_finite_losses_in_their_dtype(case):
    for name in BACKENDS:
        rows, _, grads = run_kd(case, name)
        assert rows.dtype == case.zs.dtype and grads[0].dtype == case.zs.dtype
        assert torch.isfinite(rows.float()).all() and torch.isfinite(grads[0].float()).all()


_BAD = {
    "tau": st.one_of(st.floats(max_value=0.0), st.sampled_from([math.nan, math.inf, 1e-45,
                                                               1e300, None, "3"])),
    "eps": st.one_of(st.floats(max_value=0.0), st.sampled_from([math.nan, -math.inf, 1e-200,
                                                               1e200, [0.1]])),
    "n_iters": st.sampled_from([0, -3, 1.5, None, True]),
    "tol": st.sampled_from([0.0, -1e-3, math.nan, "small"]),
    "check_every": st.sampled_from([0, 2.0, None]),
    "reduction": st.text(max_size=6).filter(lambda s: s not in ("mean", "sum", "none")),
    "grad": st.text(max_size=6).filter(lambda s: s not in ("envelope", "unrolled")),
    "method": st.text(max_size=6).filter(lambda s: s not in ("auto", "log", "standard")),
    "backend": st.text(max_size=6).filter(lambda s: s not in ("auto", "torch", "cpp",
                                                              "triton")),
}


@budget(150)
@given(case=kd_cases(bad=False), data=st.data())
def test_bad_arguments_raise_value_error_naming_the_argument(case, data):
    name = data.draw(st.sampled_from(sorted(_BAD)))
    opts = dict(case.opts, tau=case.tau, eps=case.eps)
    opts[name] = data.draw(_BAD[name])
    with pytest.raises(ValueError) as info:
        sk.sinkhorn_kd_loss(case.zs, case.zt, case.cost, **opts)
    assert str(info.value).split(" ")[0] == name, f"{name}: {info.value!r}"
