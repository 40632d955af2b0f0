"""``backend="auto"`` on CUDA tensors: the registry's expected-speed-up rule and the Triton
backend's estimates (docs/gpu.md, "Dispatch"). Runs without a GPU: the Triton backend is told it
supports CUDA where the decision itself is under test."""
import pytest
import torch

from selkd_kernels.ops.registry import BackendRegistry
from selkd_kernels.ops.sinkhorn import dispatch

triton = pytest.importorskip("triton")
from selkd_kernels.ops.sinkhorn import triton as tri  # noqa: E402
from selkd_kernels.ops.sinkhorn import triton_model as TM  # noqa: E402


class _Fake:
    def __init__(self, name, speed=None, devices=("cpu", "cuda")):
        self.name = name
        self._speed = speed
        self._devices = devices

    def supports(self, device):
        return torch.device(device).type in self._devices

    def expected_speedup(self, problem):
        return self._speed


def _registry(fast):
    reg = BackendRegistry("test", modules={}, auto_order={"cuda": ("triton", "torch")},
                          reference=_Fake("torch"))
    reg._loaded["triton"] = fast
    return reg


def test_auto_passes_over_a_backend_expected_slower():
    problem = object()
    slow = _registry(_Fake("triton", speed=0.5))
    assert slow.resolve("auto", torch.device("cuda"), problem=problem).name == "torch"
    fast = _registry(_Fake("triton", speed=3.0))
    assert fast.resolve("auto", torch.device("cuda"), problem=problem).name == "triton"
    unknown = _registry(_Fake("triton", speed=None))
    assert unknown.resolve("auto", torch.device("cuda"), problem=problem).name == "triton"
    # no description of the call: the static order, as before the hook existed
    assert slow.resolve("auto", torch.device("cuda")).name == "triton"
    # an explicit name is never second-guessed
    assert slow.resolve("triton", torch.device("cuda"), problem=problem).name == "triton"


def test_explain_says_why():
    reg = _registry(_Fake("triton", speed=0.5))
    verdicts = dict(reg.explain("cuda", problem=object()))
    assert verdicts["triton"].startswith("skipped: expected 0.50x")
    assert verdicts["torch"].startswith("picked")


def test_describe_is_none_off_cuda():
    a = torch.rand(3, 4)
    assert dispatch.describe(a, torch.rand(3, 5), torch.rand(4, 5), method="auto", n_iters=10,
                             kd=False) is None


def _problem(B, m, n, dtype="float32", method="auto", shared=True, n_iters=50):
    return dispatch.SinkhornProblem(B, m, n, dtype, shared, True, method, n_iters)


@pytest.mark.parametrize("B,m,n,method", [(256, 100, 100, "auto"), (4096, 100, 100, "auto"),
                                          (256, 1000, 1000, "auto"), (256, 100, 100, "log")])
def test_canonical_float32_workloads_expect_triton_faster(B, m, n, method):
    speed = TM.expected_speedup(_problem(B, m, n, method=method))
    assert speed is not None and speed > 1.0


def test_float64_many_classes_expects_the_reference_faster():
    # cuBLAS DGEMM beats this backend's float64 batched products (docs/gpu.md): auto must not
    # pick it there
    assert TM.expected_speedup(_problem(256, 1000, 1000, "float64")) < 1.0


def test_auto_on_cuda_follows_the_estimates(monkeypatch):
    monkeypatch.setattr(tri.TritonBackend, "supports", lambda self, device: True)
    dev = torch.device("cuda")
    reg = dispatch.REGISTRY
    assert reg.resolve("auto", dev, problem=_problem(256, 100, 100)).name == "triton"
    assert reg.resolve("auto", dev, problem=_problem(256, 1000, 1000, "float64")).name == "torch"
    assert tri.BACKEND.expected_speedup(_problem(8, 3, 4)) > 1.0


def test_costs_cover_every_kernel_with_a_hot_loop():
    # every kernel the canonical plans run in either dtype has a recorded cost, or the
    # dispatcher would have no estimate for it (and fall back to the static order)
    for dtype in (torch.float32, torch.float64):
        for m in (100, 1000):
            for method in ("auto", "log"):
                p = tri.Problem(256, m, m, dtype=dtype, method=method)
                for step in tri.plan(p):
                    if step.config.name in TM.ENTRIES_PER_TRIP:
                        key = (step.config.name, str(dtype).replace("torch.", ""))
                        assert key in TM.COSTS, key


def test_reference_model_is_launch_bound_for_small_problems():
    # eager PyTorch pays at least one op's host time per op: 4 ops per standard iteration
    us = TM.reference_estimate_us(8, 10, 10, 100, log_domain=False)
    assert us >= 100 * 4 * TM.EAGER_OP_S * 1e6
