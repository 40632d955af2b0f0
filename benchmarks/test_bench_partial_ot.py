"""Open-set selective KD (docs/ops/partial_ot.md): the partial-OT coupling, and the open-set loss forward +
backward. Providers are skipped while ``sk.partial_ot`` is not in the build."""
import pytest

from bench_support import provider_names, workloads_of


@pytest.mark.parametrize("workload", workloads_of("open-set"))
@pytest.mark.parametrize("provider", provider_names("partial-ot"))
def test_partial_ot(run_provider, provider, workload):
    run_provider("partial-ot", provider, workload)


@pytest.mark.parametrize("workload", workloads_of("open-set"))
@pytest.mark.parametrize("provider", provider_names("open-set-loss"))
def test_open_set_loss(run_provider, provider, workload):
    run_provider("open-set-loss", provider, workload)
