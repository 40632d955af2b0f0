"""The backend registry every op dispatches through (selkd_kernels/ops/registry.py)."""
import sys
import types
import warnings

import pytest
import torch

from selkd_kernels.ops import registry as R
from selkd_kernels.ops.partial_ot import dispatch as partial_dispatch
from selkd_kernels.ops.sinkhorn import dispatch as sinkhorn_dispatch

CPU = torch.device("cpu")


class _Backend:
    def __init__(self, name, devices=("cpu",)):
        self.name = name
        self._devices = devices

    def supports(self, device):
        return torch.device(device).type in self._devices


def _module(monkeypatch, modname, backend):
    mod = types.ModuleType(modname)
    mod.BACKEND = backend
    monkeypatch.setitem(sys.modules, modname, mod)
    return modname


def _registry(monkeypatch, cpp=None, triton=None):
    """A registry whose 'cpp' / 'triton' modules are fakes (None: the import fails)."""
    modules = {}
    for name, be in (("cpp", cpp), ("triton", triton)):
        modname = f"tests.ops._fake_{name}_backend"
        if be is None:
            monkeypatch.setitem(sys.modules, modname, None)  # import raises ImportError
        else:
            _module(monkeypatch, modname, be)
        modules[name] = modname
    return R.BackendRegistry("fake_op", modules, {"cpu": ("cpp", "triton", "torch")},
                             _Backend("torch", ("cpu", "cuda", "meta")))


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(R.ENV_VAR, raising=False)


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="backend"):
        R.check_backend_name("bogus")
    with pytest.raises(ValueError, match="backend"):
        R.check_backend_name(None)
    with pytest.raises(ValueError, match="backend"):
        sinkhorn_dispatch.get_backend("cuda", CPU)  # the speculative CUDA backend is gone
    assert R.check_backend_name("auto") == "auto"


def test_auto_takes_the_first_available_backend(monkeypatch):
    reg = _registry(monkeypatch, cpp=_Backend("cpp"), triton=_Backend("triton"))
    assert reg.resolve("auto", CPU).name == "cpp"
    assert reg.resolve("triton", CPU).name == "triton"


def test_auto_falls_back_with_one_warning_that_says_why(monkeypatch):
    reg = _registry(monkeypatch, cpp=None, triton=_Backend("triton", devices=("cuda",)))
    with pytest.warns(RuntimeWarning) as rec:
        assert reg.resolve("auto", CPU).name == "torch"
    messages = [str(w.message) for w in rec]
    assert any("fake_op" in m and "'cpp' unavailable" in m and "ModuleNotFoundError" in m
               for m in messages)
    assert any("'triton' unavailable" in m and "does not run on cpu" in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per device type and backend
        assert reg.resolve("auto", CPU).name == "torch"


def test_explicit_unavailable_backend_raises_with_the_reason(monkeypatch):
    reg = _registry(monkeypatch, cpp=None, triton=_Backend("triton", devices=("cuda",)))
    with pytest.raises(ValueError, match=r"'cpp' is not available for fake_op.*NotFoundError"):
        reg.resolve("cpp", CPU)
    with pytest.raises(ValueError, match="cannot run fake_op on cpu"):
        reg.resolve("triton", CPU)
    assert "ModuleNotFoundError" in reg.unavailable_reason("cpp")
    assert reg.unavailable_reason("torch") is None


def test_environment_variable_forces_auto(monkeypatch):
    reg = _registry(monkeypatch, cpp=_Backend("cpp"), triton=_Backend("triton"))
    monkeypatch.setenv(R.ENV_VAR, "triton")
    assert reg.resolve("auto", CPU).name == "triton"
    assert reg.resolve("cpp", CPU).name == "cpp"  # an explicit name wins over the variable
    monkeypatch.setenv(R.ENV_VAR, " AUTO ")
    assert reg.resolve("auto", CPU).name == "cpp"
    monkeypatch.setenv(R.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=R.ENV_VAR):
        reg.resolve("auto", CPU)


def test_available_lists_only_backends_that_run_here(monkeypatch):
    reg = _registry(monkeypatch, cpp=_Backend("cpp"), triton=_Backend("triton", devices=("cuda",)))
    want = ["torch", "cpp"] + (["triton"] if torch.cuda.is_available() else [])
    assert reg.available() == want
    assert reg.available("cpu") == ["torch", "cpp"]
    assert reg.available("meta") == ["torch"]


def test_every_op_registry_offers_the_reference_everywhere():
    for reg in (sinkhorn_dispatch.REGISTRY, partial_dispatch.REGISTRY):
        assert reg.resolve("torch", torch.device("meta")).name == "torch"
        assert "torch" in reg.available("cpu")
