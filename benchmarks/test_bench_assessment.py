"""Teacher assessment (docs/assessment.md): ``sk.assess_teachers`` on a synthetic repository; the timing
covers every teacher (``extra_info["n_teachers"]``). Skipped while it is not in the build."""
import pytest

from bench_support import provider_names, workloads_of


@pytest.mark.parametrize("workload", workloads_of("assessment"))
@pytest.mark.parametrize("provider", provider_names("assessment"))
def test_assessment(run_provider, provider, workload):
    run_provider("assessment", provider, workload)
