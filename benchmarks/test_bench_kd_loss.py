"""Sinkhorn KD loss (docs/ops/sinkhorn.md, docs/losses.md): forward of a training step, and forward + backward."""
import pytest

from bench_support import provider_names, workloads_of


@pytest.mark.parametrize("workload", workloads_of("ot"))
@pytest.mark.parametrize("provider", provider_names("kd-forward"))
def test_kd_forward(run_provider, provider, workload):
    run_provider("kd-forward", provider, workload)


@pytest.mark.parametrize("workload", workloads_of("ot"))
@pytest.mark.parametrize("provider", provider_names("kd-forward-backward"))
def test_kd_forward_backward(run_provider, provider, workload):
    run_provider("kd-forward-backward", provider, workload)
