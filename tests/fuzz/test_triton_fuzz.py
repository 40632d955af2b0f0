"""Fuzzing the Triton backend under the interpreter (``TRITON_INTERPRET=1``, tests/conftest.py):
tiny shapes, few iterations and few examples, since every program runs in Python. The same
guarantees and the same comparison with the float64 reference as for torch and cpp
(tests/fuzz/test_sinkhorn_fuzz.py, tests/fuzz/test_kd_fuzz.py)."""
import warnings

import pytest
import torch
from hypothesis import given

import selkd_kernels as sk

from selkd_kernels.ops.sinkhorn.dispatch import REGISTRY
from tests.fuzz import test_kd_fuzz as kd
from tests.fuzz import test_sinkhorn_fuzz as sf
from tests.fuzz.strategies import budget, kd_cases, ot_cases
from tests.utils import require_backend

warnings.filterwarnings("ignore", message="selkd_kernels")
warnings.filterwarnings("ignore", category=RuntimeWarning)  # the interpreter's NaN arithmetic


@pytest.fixture(autouse=True)
def _triton_only(monkeypatch):
    require_backend(REGISTRY, "triton")
    monkeypatch.setattr(sf, "BACKENDS", ["triton"])
    monkeypatch.setattr(kd, "BACKENDS", ["triton"])


def _tiny(case):
    case.opts["n_iters"] = min(case.opts["n_iters"], 4)
    return case


@budget(5)
@given(case=ot_cases(max_b=2, max_k=4))
def test_triton_solve_matches_the_float64_reference(case):
    sf._check_backends(_tiny(case))


@budget(8)
@given(case=kd_cases(max_b=2, max_k=4))
def test_triton_kd_matches_the_float64_reference(case):
    kd._check(_tiny(case))


def test_bad_row_potentials_are_nan():
    a = torch.full((2, 3), 1 / 3)
    b = torch.full((2, 4), 0.25)
    M = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0))
    M[0, 1, 1] = float("inf")
    r = sk.sinkhorn(a, b, M, eps=0.5, n_iters=3, backend="triton")
    assert torch.isnan(r.loss[0])
    assert torch.isnan(r.alpha[0]).all() and torch.isnan(r.beta[0]).all()


@pytest.mark.slow
@budget(100)
@given(case=ot_cases(max_b=3, max_k=17))
def test_triton_solve_matches_the_float64_reference_long(case):
    sf._check_backends(case)
