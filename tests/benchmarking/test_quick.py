"""Benchmark harness: the CI smoke run writes complete results, the timer's statistics are right,
and the baselines solve the same problem as the reference (so speed-up ratios compare like with
like)."""
import csv
import json
import math

import numpy as np
import pytest
import torch

import selkd_kernels as sk
from selkd_kernels import cli
from selkd_kernels.ops.sinkhorn import reference as ref
from selkd_kernels.benchmarking import baselines as BL
from selkd_kernels.benchmarking import providers as P
from selkd_kernels.benchmarking.report import CSV_FIELDS
from selkd_kernels.benchmarking.timer import (Timer, TimingStats, measure_peak_memory,
                                              percentile)
from selkd_kernels.benchmarking.workloads import (QUICK_WORKLOADS, Workload, make_inputs,
                                                  make_ot_inputs)


# ----------------------------------------------------------------------------- quick CLI run

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = cli.main(["bench", "--quick", "--out", str(out)])
    return rc, out


def test_quick_run_succeeds(quick_run):
    rc, _ = quick_run
    assert rc == 0


def test_quick_json_has_metadata_and_fields(quick_run):
    _, out = quick_run
    data = json.loads((out / "results.json").read_text())
    meta = data["meta"]
    assert meta["quick"] is True
    for key in ("date_utc", "machine", "versions", "git", "device", "timing", "statistics"):
        assert key in meta
    assert meta["machine"]["cpu_model"] and meta["machine"]["usable_cores"] >= 1
    assert meta["versions"]["torch"] == torch.__version__
    assert "POT" in meta["versions"] and "triton" in meta["versions"]
    assert "commit" in meta["git"]
    rows = data["results"]
    assert rows
    for r in rows:
        assert set(CSV_FIELDS) <= set(r), set(CSV_FIELDS) - set(r)
        assert r["status"] in ("ok", "n/a", "unavailable", "skipped"), r
        if r["status"] == "ok":
            assert r["value"] is not None and math.isfinite(r["value"]), r
            assert r["time_ms_median"] is not None and r["time_ms_median"] > 0
            # quick runs make no timing claims
            assert r["speedup_vs_plain"] is None and r["speedup_vs_pot"] is None
        if r["agrees_with_ref"] is not None:
            assert r["agrees_with_ref"], r


def test_quick_every_available_provider_appears(quick_run):
    _, out = quick_run
    rows = json.loads((out / "results.json").read_text())["results"]
    seen = {(r["op"], r["provider"]): r["status"] for r in rows}
    for op in P.ALL_OPS:
        for prov in P.providers_for(op, "cpu"):
            assert (op, prov.name) in seen, (op, prov.name)
            if prov.unavailable is None:
                ran = [r for r in rows if r["op"] == op and r["provider"] == prov.name
                       and r["status"] == "ok"]
                assert ran, f"{op}/{prov.name} is available but never ran"
    # the package's own solve is always there, and so are the baselines of the comparison
    assert seen[("sinkhorn", "reference")] == "ok"
    assert seen[("sinkhorn", "plain:scaling")] == "ok"
    assert seen[("sinkhorn", "pot:batch")] == "ok"


def test_quick_csv_matches_json(quick_run):
    _, out = quick_run
    rows = json.loads((out / "results.json").read_text())["results"]
    with open(out / "results.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CSV_FIELDS
        csv_rows = list(reader)
    assert len(csv_rows) == len(rows)
    assert [r["provider"] for r in csv_rows] == [r["provider"] for r in rows]


def test_quick_plots_written(quick_run):
    _, out = quick_run
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "workloads_sinkhorn.png" in pngs
    assert "sweep_batch_sinkhorn.png" in pngs
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_unknown_workload(capsys):
    assert cli.main(["bench", "--workloads", "nope"]) == 2


# ----------------------------------------------------------------------------- timer

class FakeClock:
    """Returns the given instants one per call."""

    def __init__(self, instants):
        self.instants = list(instants)

    def __call__(self):
        return self.instants.pop(0)


def test_timer_statistics_on_fake_clock():
    # one warm-up (2 clock reads) then 5 samples of 2 reads each: durations 9, 1, 4, 3, 2 s
    clock = FakeClock([0.0, 100.0,
                       0.0, 9.0, 10.0, 11.0, 20.0, 24.0, 30.0, 33.0, 40.0, 42.0])
    calls = []
    t = Timer("cpu", clock=clock)
    stats = t.measure(lambda: calls.append(1), repeats=5, warmup=1, number=1)
    assert len(calls) == 6
    assert stats.samples == [9.0, 1.0, 4.0, 3.0, 2.0]
    assert stats.median == 3.0
    assert stats.q1 == 2.0 and stats.q3 == 4.0 and stats.iqr == 2.0
    assert stats.min == 1.0 and stats.mean == pytest.approx(3.8)
    d = stats.as_dict()
    assert d["time_ms_median"] == 3000.0 and d["repeats"] == 5 and d["number"] == 1


def test_timer_divides_by_number_of_calls():
    clock = FakeClock([0.0, 10.0, 10.0, 30.0])
    calls = []
    stats = Timer("cpu", clock=clock).measure(lambda: calls.append(1), repeats=2, warmup=0,
                                              number=5)
    assert len(calls) == 10
    assert stats.samples == [2.0, 4.0] and stats.number == 5


def test_timer_calibration():
    t = Timer("cpu", min_sample_time=1e-3)
    assert t.calibrate(2e-3) == 1
    assert t.calibrate(1e-4) == 10
    assert t.calibrate(3e-4) == 5
    assert t.calibrate(0.0) == t.max_number


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 8, 31):
        xs = sorted(rng.random(n).tolist())
        for q in (0, 25, 50, 75, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert math.isnan(TimingStats([]).median)


def test_peak_memory_sees_a_large_allocation():
    def alloc():
        x = torch.ones(16 * 2 ** 20)  # 64 MiB
        x.add_(1.0)
        return float(x[0])
    mb, method = measure_peak_memory(alloc, "cpu")
    if mb is None:
        pytest.skip(f"no CPU peak-memory method here: {method}")
    assert 48 <= mb <= 512, mb


# ----------------------------------------------------------------------------- baselines agree

def _small(eps, n_iters):
    return Workload("t", "ot", 24, 17, 13, eps, n_iters)


@pytest.mark.parametrize("eps,n_iters", [(0.1, 30), (0.01, 60)])
def test_plain_and_pot_solves_match_reference(eps, n_iters):
    w = _small(eps, n_iters)
    inp = make_ot_inputs(w, dtype=torch.float64)
    expect = ref.solve(inp.a, inp.b, inp.cost, eps=eps, n_iters=n_iters).loss
    log = BL.plain_log_sinkhorn(inp.a, inp.b, inp.cost, eps, n_iters)
    torch.testing.assert_close(log, expect, rtol=1e-9, atol=1e-10)
    if BL.scaling_is_safe(inp.cost, eps):
        sc = BL.plain_scaling_sinkhorn(inp.a, inp.b, inp.cost, eps, n_iters)
        torch.testing.assert_close(sc, expect, rtol=1e-9, atol=1e-10)
    else:
        assert eps == 0.01  # the sharp case must take the log loop
    pytest.importorskip("ot")
    log_domain = not BL.scaling_is_safe(inp.cost, eps)
    pb = BL.pot_batch_rows(inp.a, inp.b, inp.cost, eps, n_iters, log_domain, grad="detach")
    torch.testing.assert_close(pb, expect, rtol=1e-7, atol=1e-9)
    pl = BL.pot_loop_rows(inp.a.numpy(), inp.b.numpy(), inp.cost.T.contiguous().numpy(), eps,
                          n_iters, log_domain)
    torch.testing.assert_close(torch.from_numpy(pl), expect, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("domain", ["scaling", "log"])
def test_plain_kd_loss_matches_package_loss_and_gradient_direction(domain):
    w = _small(0.1, 40)
    inp = make_ot_inputs(w, dtype=torch.float64)
    zs1 = inp.student_logits.clone().requires_grad_(True)
    zs2 = inp.student_logits.clone().requires_grad_(True)
    plain = BL.plain_kd_loss(zs1, inp.teacher_logits, inp.cost, w.tau, w.eps, w.n_iters, domain)
    pkg = sk.sinkhorn_kd_loss(zs2, inp.teacher_logits, inp.cost, tau=w.tau, eps=w.eps,
                              n_iters=w.n_iters, backend="torch")
    torch.testing.assert_close(plain, pkg, rtol=1e-9, atol=1e-12)
    plain.backward()
    pkg.backward()
    # unrolled vs envelope gradients coincide at convergence; after 40 iterations, closely
    cos = torch.nn.functional.cosine_similarity(zs1.grad.flatten(), zs2.grad.flatten(), dim=0)
    assert cos > 0.99


@pytest.mark.parametrize("method", ["exact", "bregman"])
def test_plain_partial_ot_matches_package(method):
    if getattr(sk, "partial_ot", None) is None:
        pytest.skip("sk.partial_ot not in this build")
    w = QUICK_WORKLOADS["open-set"]
    inp = make_inputs(w, dtype=torch.float64)
    expect = sk.partial_ot(inp.student_scores, inp.gamma, eps=w.eps, method=method,
                           n_iters=w.n_iters, backend="torch")
    if method == "exact":
        got = BL.plain_partial_exact(inp.student_scores, inp.gamma, w.eps)
    else:
        got = BL.plain_partial_bregman(inp.student_scores, inp.gamma, w.eps, w.n_iters)
    torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-12)
    assert float(got.sum()) == pytest.approx(inp.gamma)


# ----------------------------------------------------------------------------- provider selection

def _selected(patterns, op="sinkhorn"):
    return [p.name for p in P.select(P.providers_for(op, "cpu"), patterns)]


def test_select_a_name_that_is_also_a_family_keeps_that_provider_alone():
    assert _selected(["reference"]) == ["reference"]


def test_select_family_wildcard_and_bare_family_keep_the_whole_family():
    family = [p.name for p in P.providers_for("sinkhorn", "cpu") if p.family == "reference"]
    assert len(family) > 1
    assert _selected(["reference:*"]) == family
    plain = _selected(["plain"])
    assert plain and all(n.startswith("plain:") for n in plain)


def test_select_exact_names_and_no_patterns():
    assert _selected(["plain:log", "reference:compiled"]) == ["reference:compiled", "plain:log"]
    assert _selected(None) == [p.name for p in P.providers_for("sinkhorn", "cpu")]
    assert _selected(["no-such-provider"]) == []
