"""Batched Sinkhorn solve (docs/ops/sinkhorn.md) on the "ot" workloads, every provider."""
import pytest

from bench_support import provider_names, workloads_of


@pytest.mark.parametrize("workload", workloads_of("ot"))
@pytest.mark.parametrize("provider", provider_names("sinkhorn"))
def test_sinkhorn(run_provider, provider, workload):
    run_provider("sinkhorn", provider, workload)
