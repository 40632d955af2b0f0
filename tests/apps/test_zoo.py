"""Protocol v2 invariants: windows and overlaps, task splits, determinism in the seed, the
stacked student trainer, and the cache's safety (weights_only loads, rebuild on bad files)."""
import os
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

from selkd_kernels.apps import datasets as D
from selkd_kernels.apps.students import task_ground_truth
from selkd_kernels.apps.training import MLP, StackedMLP, member_accuracies, train
from selkd_kernels.apps.zoo import ZooConfig, build_zoo, cache_path, sliding_windows


def tiny_config(seed=0, **kw):
    """12 classes in 3 super-classes, windows of 4 stepping by 2: overlaps 100/50/0%."""
    fams = {"wide": {"hidden": [32], "epochs": 30, "label_smoothing": 0.0},
            "smooth": {"hidden": [16], "epochs": 30, "label_smoothing": 0.3}}
    syn = {**D.SYNTHETIC_DEFAULTS, "num_classes": 12, "num_super": 3, "train_per_class": 20,
           "test_per_class": 10}
    base = dict(dataset="synthetic", seed=seed, window_size=4, window_step=2, families=fams,
                shots=3, pool_per_class=4, val_per_class=3, student_hidden=8, student_epochs=8,
                kd_weights=(1.0, 10.0), student_seeds=2, synthetic=syn, sinkhorn_iters=10)
    base.update(kw)
    return ZooConfig(**base)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tiny_config(), cache_dir=str(tmp_path_factory.mktemp("zoo")),
                     progress=False)


def test_windows_give_the_paper_overlaps():
    w = sliding_windows(list(range(40)), 20, 5)
    assert len(w) == 5 and w[0] == list(range(20)) and w[-1] == list(range(20, 40))
    ov = sorted({len(set(w[0]) & set(b)) / 20 for b in w}, reverse=True)
    assert ov == [1.0, 0.75, 0.5, 0.25, 0.0]
    # digits: windows of 4 stepping by 1 give the same overlap levels
    d = sliding_windows(list(range(10)), 4, 1)
    assert sorted({len(set(d[0]) & set(b)) / 4 for b in d}, reverse=True)[:5] == \
        [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="window_size"):
        sliding_windows(list(range(5)), 6, 1)


def test_presets_and_validation():
    syn = ZooConfig.preset("synthetic")
    assert len(syn.families) >= 3 and syn.student_seeds >= 2 and len(syn.kd_weights) >= 2
    assert ZooConfig.preset("synthetic", quick=True).key() != syn.key()
    assert ZooConfig.preset("digits").tasks == (0, 3, 6)
    with pytest.raises(ValueError, match="dataset"):
        ZooConfig(dataset="cifar")
    with pytest.raises(ValueError, match="student_seeds"):
        ZooConfig(student_seeds=0)
    with pytest.raises(ValueError, match="kd_weights"):
        ZooConfig(kd_weights=(0.0, 1.0))
    with pytest.raises(ValueError, match="families"):
        ZooConfig(families={"x": {"hidden": [4]}})


def test_synthetic_structure_and_determinism():
    a, b = D.synthetic(3), D.synthetic(3)
    assert torch.equal(a.x_teacher, b.x_teacher) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(D.synthetic(4).x_teacher, a.x_teacher)
    assert a.num_classes == 40 and int(a.superclass.max()) == 7
    assert a.x_teacher.shape[1] == 64
    assert abs(float(a.x_teacher.mean())) < 1e-4  # standardised on its own split


def test_task_splits_are_disjoint_and_sized(zoo):
    cfg = zoo.cfg
    t = zoo.target_task(1)
    c = len(t.classes)
    assert t.x_lab.shape[0] == cfg.shots * c and t.x_val.shape[0] == cfg.val_per_class * c
    assert t.x_pool.shape[0] == (cfg.shots + cfg.pool_per_class) * c
    assert torch.equal(t.x_pool[:t.x_lab.shape[0]], t.x_lab)  # pool = shots + unlabelled
    rows = [tuple(r.tolist()) for r in torch.cat([t.x_pool, t.x_val])]
    assert len(set(rows)) == len(rows)  # no sample in two roles
    assert int(t.y_lab.min()) == 0 and int(t.y_lab.max()) == c - 1
    again = zoo.target_task(1)
    assert torch.equal(again.x_lab, t.x_lab) and torch.equal(again.x_val, t.x_val)


def test_teacher_families_and_overlaps(zoo):
    assert len(zoo.teachers) == 2 * len(zoo.windows)
    assert {t["family"] for t in zoo.teachers} == {"wide", "smooth"}
    assert zoo.overlap(0, 0) == 1.0 and zoo.overlap(0, 1) == 0.5 and zoo.overlap(0, 2) == 0.0
    smooth = [t["entropy"] for t in zoo.teachers if t["family"] == "smooth"]
    wide = [t["entropy"] for t in zoo.teachers if t["family"] == "wide"]
    assert min(smooth) > max(wide)  # label smoothing makes a less confident family


def test_ground_truth_records(zoo):
    gt = task_ground_truth(zoo, 0)
    assert set(gt) == {-1, *range(len(zoo.teachers))}
    for h, r in gt.items():
        assert len(r["test_by_seed"]) == zoo.cfg.student_seeds
        assert r["acc"] == pytest.approx(sum(r["test_by_seed"]) / len(r["test_by_seed"]))
        if h >= 0:
            assert r["lambda"] in zoo.cfg.kd_weights
            j = zoo.cfg.kd_weights.index(r["lambda"])
            assert r["val_by_lambda"][j] == max(r["val_by_lambda"])
            assert r["acc"] == pytest.approx(r["test_by_lambda"][j])
    assert task_ground_truth(zoo, 0) is not None and (0, 0) in zoo.ground_truth


def test_ground_truth_is_deterministic(tmp_path):
    a = build_zoo(tiny_config(), use_cache=False, progress=False)
    b = build_zoo(tiny_config(), use_cache=False, progress=False)
    ga, gb = task_ground_truth(a, 2), task_ground_truth(b, 2)
    assert [ga[h]["test_by_seed"] for h in ga] == [gb[h]["test_by_seed"] for h in gb]
    c = build_zoo(tiny_config(seed=1), use_cache=False, progress=False)
    assert c.windows != a.windows or not torch.equal(c.data.x_teacher, a.data.x_teacher)


def test_stacked_mlp_trains_each_member_as_alone():
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    net = StackedMLP(6, (8, 5), 3, seeds=[11, 12])
    torch.manual_seed(12)
    alone = MLP(6, (8, 5), 3)
    torch.testing.assert_close(net(x)[1], alone(x))
    train(net, x, epochs=15, loss_fn=lambda z, idx: sum(F.cross_entropy(z[k], y[idx])
                                                        for k in range(2)))
    train(alone, x, y, epochs=15)
    torch.testing.assert_close(net.member(1)(x), alone(x), atol=1e-5, rtol=1e-5)
    acc = member_accuracies(net, x, y)
    assert acc.shape == (2,) and float(acc[1]) == pytest.approx(
        float((alone(x).argmax(1) == y).float().mean()))
    with pytest.raises(ValueError, match="seeds"):
        StackedMLP(6, (8,), 3, seeds=[])


def test_cache_roundtrip_uses_weights_only(tmp_path):
    cfg = tiny_config()
    zoo = build_zoo(cfg, cache_dir=str(tmp_path), progress=False)
    task_ground_truth(zoo, 1)
    from selkd_kernels.apps.zoo import save_zoo
    path = save_zoo(zoo, str(tmp_path))
    torch.load(path, weights_only=True)  # plain tensors / lists / dicts only
    again = build_zoo(cfg, cache_dir=str(tmp_path), progress=False)
    assert (1, 0) in again.ground_truth
    x = zoo.target_task(1).x_lab
    torch.testing.assert_close(again.teachers[0]["model"](x), zoo.teachers[0]["model"](x))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["SELKD_PLANTED_MARK"],))


def test_planted_pickle_is_never_executed_and_is_rebuilt(tmp_path, monkeypatch):
    cfg = tiny_config()
    mark = tmp_path / "executed"
    monkeypatch.setenv("SELKD_PLANTED_MARK", str(mark))
    path = cache_path(cfg, str(tmp_path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"format": 2, "payload": _Payload()}, f)
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        zoo = build_zoo(cfg, cache_dir=str(tmp_path), progress=False)
    assert not mark.exists()
    assert len(zoo.teachers) == 2 * len(zoo.windows)
    torch.load(path, weights_only=True)  # the rebuilt file is a genuine cache


def test_truncated_or_foreign_cache_is_rebuilt(tmp_path):
    cfg = tiny_config()
    good = build_zoo(cfg, cache_dir=str(tmp_path), progress=False)
    path = cache_path(cfg, str(tmp_path))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        zoo = build_zoo(cfg, cache_dir=str(tmp_path), progress=False)
    x = zoo.target_task(0).x_lab
    torch.testing.assert_close(zoo.teachers[0]["model"](x), good.teachers[0]["model"](x))
    torch.save({"format": 2, "key": "someone-else"}, path)
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        build_zoo(cfg, cache_dir=str(tmp_path), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_zoo(cfg, cache_dir=str(tmp_path), progress=False)  # now valid: no warning


def test_mnist_format_conversion():
    import numpy as np
    img = np.zeros((1, 784))
    img[0, :] = 255.0
    out = D.mnist_as_sklearn_digits(img)
    assert out.shape == (1, 64)
    # the 2-pixel padding leaves the border blocks half full: 16 * (2*4)/16 ... corners 16*4/16
    grid = out.reshape(8, 8)
    assert grid[3, 3] == 16.0 and grid[0, 0] == pytest.approx(16.0 * 4 / 16)
    assert grid[0, 3] == pytest.approx(16.0 * 8 / 16)
