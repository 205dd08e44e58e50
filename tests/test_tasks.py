"""Tests of probe.tasks: one contract suite subclassed per task, plus metrics on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probe.tasks import TargetInfo, create_task, get_task, target_kind, task_names, tasks_for_targets
from probe.tasks.base import as_tensor_batch
from probe.tasks.instances import global_instance_ids, large_counts
from runtime.errors import UnknownNameError

H = W = 16


def _t(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return as_tensor_batch(batch)


def _concat(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([a[k], b[k]]) for k in a}


class TaskContract:
    """Every task: subclasses set ``name``/``info``/``options`` and build targets and predictions."""

    name: str
    info = TargetInfo()
    options: dict = {}
    best: float  # the primary metric of a perfect prediction

    def make_task(self):
        return create_task(self.name, self.info, **self.options)

    def make_batch(self, rng: np.random.Generator, b: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def perfect_pred(self, batch: dict[str, np.ndarray]) -> torch.Tensor:
        raise NotImplementedError

    def random_pred(self, task, batch: dict[str, np.ndarray], seed: int = 0) -> torch.Tensor:
        b = next(iter(batch.values())).shape[0]
        g = torch.Generator().manual_seed(seed)
        return torch.randn(b, task.out_channels(), H, W, generator=g)

    def _metrics(self, task, pairs) -> dict[str, float]:
        state = task.metric_state()
        for pred, batch in pairs:
            task.update(state, pred, _t(batch))
        return task.compute(state)

    def test_registry_and_attributes(self):
        task = self.make_task()
        assert get_task(self.name) is type(task)
        assert task.name == self.name and task.lr in (1e-3, 2e-3)
        assert isinstance(task.primary_metric, str) and task.needs
        assert target_kind(self.name) == task.target_kind

    def test_batch_has_what_task_needs(self):
        batch = self.make_batch(np.random.default_rng(0), 2)
        assert set(self.make_task().needs) <= set(batch)

    def test_loss_finite_and_differentiable(self):
        task = self.make_task()
        batch = _t(self.make_batch(np.random.default_rng(0), 3))
        pred = torch.randn(3, task.out_channels(), H, W, requires_grad=True)
        extra = task.extra_module()
        loss = task.loss(pred, batch, extra)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
        if extra is not None:
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in extra.parameters())

    def test_perfect_prediction_is_best(self):
        task = self.make_task()
        batch = self.make_batch(np.random.default_rng(1), 4)
        perfect = self._metrics(task, [(self.perfect_pred(batch), batch)])
        rand = self._metrics(task, [(self.random_pred(task, batch), batch)])
        key = task.primary_metric
        assert perfect[key] == pytest.approx(self.best, abs=1e-6)
        assert (perfect[key] > rand[key]) if task.higher_is_better else (perfect[key] < rand[key])

    def test_streaming_equals_one_batch(self):
        task = self.make_task()
        rng = np.random.default_rng(2)
        b1, b2 = self.make_batch(rng, 2), self.make_batch(rng, 3)
        p1, p2 = self.random_pred(task, b1, 1), self.random_pred(task, b2, 2)
        two = self._metrics(task, [(p1, b1), (p2, b2)])
        one = self._metrics(task, [(torch.cat([p1, p2]), _concat(b1, b2))])
        assert two.keys() == one.keys()
        for k in one:
            assert two[k] == pytest.approx(one[k], rel=1e-9, abs=1e-12, nan_ok=True), k

    def test_trivial_metrics(self):
        task = self.make_task()
        rng = np.random.default_rng(3)
        train = [self.make_batch(rng, 2) for _ in range(2)]
        evals = [self.make_batch(rng, 2) for _ in range(2)]
        triv = task.trivial_metrics(iter(train), iter(evals))
        key = task.primary_metric
        assert key in triv and math.isfinite(triv[key])
        perfect = self._metrics(task, [(self.perfect_pred(b), b) for b in evals])
        assert (perfect[key] >= triv[key]) if task.higher_is_better else (perfect[key] <= triv[key])


# ---- boundaries ---------------------------------------------------------------------------------


class TestBoundaries(TaskContract):
    name = "boundaries"
    best = 100.0

    def make_batch(self, rng, b):
        t = (rng.random((b, H, W)) < 0.2).astype(np.uint8)
        t[rng.random((b, H, W)) < 0.05] = 255
        return {"boundaries": t}

    def perfect_pred(self, batch):
        return torch.from_numpy(np.where(batch["boundaries"] == 1, 10.0, -10.0)).float()[:, None]

    def test_shifted_band_iou_by_hand(self):
        task = self.make_task()
        t = np.zeros((1, 8, 8), np.uint8)
        t[:, :, 4:6] = 1  # 16 boundary pixels
        pred = torch.full((1, 1, 8, 8), -5.0)
        pred[:, :, :, 5:7] = 5.0  # shifted one column: 8 shared, union 24
        out = self._metrics(task, [(pred, {"boundaries": t})])
        assert out["iou"] == pytest.approx(100 * 8 / 24)

    def test_ignored_pixels_and_ce(self):
        task = self.make_task()
        t = np.array([[[1, 0, 255, 255]]], np.uint8)
        pred = torch.tensor([[[[3.0, -3.0, 9.0, -9.0]]]])  # ignored pixels would add a false positive
        out = self._metrics(task, [(pred, {"boundaries": t})])
        assert out["iou"] == pytest.approx(100.0)
        assert out["ce"] == pytest.approx(math.log1p(math.exp(-3.0)))
        zero = self._metrics(task, [(torch.zeros(1, 1, 1, 4), {"boundaries": t})])
        assert zero["ce"] == pytest.approx(math.log(2)) and zero["iou"] == 0.0

    def test_trivial_by_hand(self):
        task = self.make_task()
        train = {"boundaries": np.array([[[1, 0, 0, 0]]], np.uint8)}  # p = 0.25
        ev = {"boundaries": np.array([[[1, 1, 0, 0]]], np.uint8)}
        out = task.trivial_metrics([train], [ev])
        assert out["boundary_rate_train"] == pytest.approx(0.25)
        assert out["iou"] == 0.0  # p < 0.5 predicts no boundary
        assert out["iou_all_boundary"] == pytest.approx(50.0)
        assert out["ce"] == pytest.approx(-(math.log(0.25) + math.log(0.75)) / 2)


# ---- distance -----------------------------------------------------------------------------------


class TestDistance(TaskContract):
    name = "distance"
    best = 0.0

    def make_batch(self, rng, b):
        return {"distance": rng.random((b, H, W)).astype(np.float32)}

    def perfect_pred(self, batch):
        return torch.from_numpy(batch["distance"])[:, None]

    def test_mse_by_hand(self):
        task = self.make_task()
        t = np.array([[[0.0, 0.5, 1.0, np.nan]]], np.float32)
        pred = torch.tensor([[[[0.0, 0.0, 0.0, 7.0]]]])
        assert self._metrics(task, [(pred, {"distance": t})])["mse"] == pytest.approx((0.25 + 1.0) / 3)
        assert task.loss(pred, _t({"distance": t})).item() == pytest.approx((0.25 + 1.0) / 3)

    def test_trivial_is_training_mean(self):
        task = self.make_task()
        out = task.trivial_metrics(
            [{"distance": np.array([[[0.0, 1.0]]], np.float32)}], [{"distance": np.array([[[1.0, 1.0]]], np.float32)}]
        )
        assert out["mean_train"] == pytest.approx(0.5) and out["mse"] == pytest.approx(0.25)


# ---- depth --------------------------------------------------------------------------------------


class TestDepth(TaskContract):
    name = "depth"
    best = 0.0

    def make_batch(self, rng, b):
        d = (0.5 + 5 * rng.random((b, H, W))).astype(np.float32)
        d[rng.random((b, H, W)) < 0.1] = 0.0
        return {"depth": d}

    def perfect_pred(self, batch):
        return torch.from_numpy(batch["depth"])[:, None]

    def test_metrics_by_hand(self):
        task = self.make_task()
        g = np.array([[[1.0, 2.0, 4.0, 0.0]]], np.float32)
        pred = torch.tensor([[[[1.1, 2.0, 2.0, 100.0]]]], dtype=torch.float64)  # last pixel invalid
        out = self._metrics(task, [(pred, {"depth": g})])
        assert out["mse"] == pytest.approx(4.01 / 3)
        assert out["rmse"] == pytest.approx(math.sqrt(4.01 / 3))
        assert out["absrel"] == pytest.approx((0.1 + 0.0 + 0.5) / 3)
        assert out["delta1"] == pytest.approx(2 / 3)
        assert task.loss(pred, _t({"depth": g})).item() == pytest.approx(4.01 / 3)

    def test_negative_prediction_clamped_for_absrel(self):
        task = self.make_task()
        out = self._metrics(task, [(torch.tensor([[[[-1.0]]]]), {"depth": np.array([[[1.0]]], np.float32)})])
        assert out["mse"] == pytest.approx(4.0)  # raw prediction
        assert out["absrel"] == pytest.approx(1 - 1e-3) and out["delta1"] == 0.0

    def test_trivial_is_mean_over_valid(self):
        task = self.make_task()
        train = {"depth": np.array([[[2.0, 4.0, 0.0]]], np.float32)}  # mean 3 (0 is invalid)
        out = task.trivial_metrics([train], [{"depth": np.array([[[3.0, 6.0]]], np.float32)}])
        assert out["mean_train"] == pytest.approx(3.0)
        assert out["mse"] == pytest.approx(4.5) and out["delta1"] == pytest.approx(0.5)


# ---- semantic segmentation ----------------------------------------------------------------------


class TestSemseg(TaskContract):
    name = "semseg"
    info = TargetInfo(num_classes=3)
    best = 100.0

    def make_batch(self, rng, b):
        s = rng.integers(0, 3, (b, H, W)).astype(np.uint8)
        s[rng.random((b, H, W)) < 0.1] = 255
        return {"semantic": s}

    def perfect_pred(self, batch):
        s = torch.from_numpy(batch["semantic"]).long()
        return 10.0 * torch.nn.functional.one_hot(s.clamp_max(2), 3).permute(0, 3, 1, 2).float()

    def test_miou_by_hand(self):
        task = create_task("semseg", TargetInfo(num_classes=3))  # class 2 is absent: not averaged
        gt = np.array([[[0, 0, 1, 1, 255]]], np.uint8)
        hit = torch.tensor([[0, 1, 1, 1, 2]])  # the ignored pixel's prediction must not count
        pred = torch.nn.functional.one_hot(hit, 3).permute(0, 2, 1)[:, :, None].float() * 5
        out = self._metrics(task, [(pred, {"semantic": gt})])
        # class 0: TP 1, FN 1 → 1/2; class 1: TP 2, FP 1 → 2/3
        assert out["miou"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
        assert out["pixel_acc"] == pytest.approx(75.0)

    def test_loss_ignores_255(self):
        task = self.make_task()
        pred = torch.zeros(1, 3, 1, 2, requires_grad=True)
        loss = task.loss(pred, _t({"semantic": np.array([[[1, 255]]], np.uint8)}))
        assert loss.item() == pytest.approx(math.log(3))
        loss.backward()
        assert pred.grad[0, :, 0, 1].abs().sum() == 0

    def test_bad_label_is_an_error(self):
        with pytest.raises(ValueError, match="outside"):
            self.make_task().loss(torch.zeros(1, 3, 1, 1), _t({"semantic": np.array([[[7]]], np.uint8)}))

    def test_trivial_is_majority_class(self):
        task = self.make_task()
        train = {"semantic": np.array([[[2, 2, 2, 0, 255, 255]]], np.uint8)}
        ev = {"semantic": np.array([[[2, 1, 255]]], np.uint8)}
        out = task.trivial_metrics([train], [ev])
        assert out["majority_class"] == 2
        assert out["pixel_acc"] == pytest.approx(50.0)
        assert out["miou"] == pytest.approx(100 * (1 / 2 + 0) / 2)  # classes 2 (1/2) and 1 (0)
        prior = np.array([2, 1, 4]) / 7  # add-one smoothed training counts (1, 0, 3)
        assert out["ce"] == pytest.approx(-(math.log(prior[2]) + math.log(prior[1])) / 2)


# ---- instances ----------------------------------------------------------------------------------


def _instance_image(rng, n_inst: int, large: int) -> dict[str, np.ndarray]:
    """A 16×16 image split into ``n_inst`` vertical stripes (ids 1..n) plus a background row."""
    inst = np.zeros((H, W), np.uint16)  # the target store's dtypes: uint16 ids, uint8 masks
    cols = np.array_split(np.arange(W), n_inst)
    for k, c in enumerate(cols, start=1):
        inst[1:, c] = k
    ignore = np.zeros((H, W), np.uint8)
    ignore[1:3, :] = rng.random((2, W)) < 0.3
    area = np.zeros(4, np.float32)
    area[:n_inst] = 100.0
    area[:large] = 96.0**2 + 1
    return {"instances": inst, "foreground": (inst > 0).astype(np.uint8), "instance_ignore": ignore, "instance_area": area}


class TestInstances(TaskContract):
    name = "instances"
    info = TargetInfo(num_instances=50)
    options = {"max_pixels": 200, "kmeans_runs": 2}
    best = 100.0

    def make_batch(self, rng, b):
        imgs = [_instance_image(rng, 4, 3 + (i % 2)) for i in range(b)]
        batch = {k: np.stack([im[k] for im in imgs]) for k in imgs[0]}
        offsets = rng.integers(0, 40, b)
        batch["instance_global"] = global_instance_ids(
            batch["instances"], offsets, batch["foreground"], batch["instance_ignore"]
        ).numpy()
        return batch

    def perfect_pred(self, batch):
        inst = torch.from_numpy(batch["instances"].astype(np.int64))
        return 5.0 * torch.nn.functional.one_hot(inst, 32).permute(0, 3, 1, 2).float()

    def test_one_hot_latents_give_100_and_random_near_0(self):
        task = create_task("instances", self.info, kmeans_runs=4)
        rng = np.random.default_rng(4)
        batch = self.make_batch(rng, 8)
        assert self._metrics(task, [(self.perfect_pred(batch), batch)])["ari"] == pytest.approx(100.0)
        rand = self._metrics(task, [(self.random_pred(task, batch), batch)])
        assert abs(rand["ari"]) < 5.0 and rand["n_eval_images"] == 8

    def test_images_with_few_large_objects_are_excluded(self):
        rng = np.random.default_rng(5)
        imgs = [_instance_image(rng, 4, large) for large in (3, 2, 4)]
        batch = {k: np.stack([im[k] for im in imgs]) for k in imgs[0]}
        task = self.make_task()
        assert task.select(_t(batch)).tolist() == [True, False, True]
        pred = self.perfect_pred(batch)
        pred[1] = torch.randn(32, H, W)  # a bad latent on the excluded image must not count
        out = self._metrics(task, [(pred, batch)])
        assert out["n_eval_images"] == 2 and out["ari"] == pytest.approx(100.0)
        lenient = create_task("instances", self.info, min_large=2, max_pixels=200, kmeans_runs=2)
        assert self._metrics(lenient, [(pred, batch)])["n_eval_images"] == 3
        # the loop may pass the count instead of the areas
        counts = {k: v for k, v in batch.items() if k != "instance_area"} | {"large_count": np.array([3, 2, 4])}
        assert task.select(_t(counts)).tolist() == [True, False, True]
        assert large_counts({"instance_area": [np.array([1e5, 1.0]), np.array([])]}, 96.0**2).tolist() == [1, 0]

    def test_global_ids(self):
        inst = np.array([[[0, 1, 2]], [[2, 0, 1]]])
        ign = np.array([[[False, False, True]], [[False, False, False]]])
        g = global_instance_ids(inst, [0, 5], ignore=ign)
        assert g.tolist() == [[[-1, 0, -1]], [[6, -1, 5]]]

    def test_loss_uses_foreground_only(self):
        task = create_task("instances", TargetInfo(num_instances=3), loss_max_pixels=None)
        torch.manual_seed(0)
        extra = task.extra_module()
        glob = torch.tensor([[[-1, 0, 2, -1]]])
        pred = torch.randn(1, 32, 1, 4, requires_grad=True)
        loss = task.loss(pred, {"instance_global": glob}, extra)
        want = torch.nn.functional.cross_entropy(extra(pred[0, :, 0, [1, 2]].T), torch.tensor([0, 2]))
        assert loss.item() == pytest.approx(want.item())
        loss.backward()
        assert pred.grad[0, :, 0, [0, 3]].abs().sum() == 0 and pred.grad[0, :, 0, 1].abs().sum() > 0
        empty = task.loss(pred, {"instance_global": torch.full((1, 1, 4), -1)}, extra)
        assert empty.item() == 0.0 and empty.requires_grad

    def test_loss_subsamples_pixels(self):
        task = create_task("instances", TargetInfo(num_instances=3), loss_max_pixels=2)
        glob = torch.zeros(1, 4, 4, dtype=torch.long)
        pred = torch.zeros(1, 32, 4, 4)
        assert task.loss(pred, {"instance_global": glob}, task.extra_module()).isfinite()

    def test_trivial_is_zero(self):
        task = self.make_task()
        rng = np.random.default_rng(6)
        out = task.trivial_metrics([], [self.make_batch(rng, 3)])
        assert out["ari"] == pytest.approx(0.0) and out["n_eval_images"] == 3

    def test_separated_latents_give_100_for_every_seed(self):
        # latents that separate the instances by construction (one-hot per id plus noise well inside
        # the gaps): every k-means seed, with or without pixel subsampling, finds the true partition
        batch = self.make_batch(np.random.default_rng(7), 4)
        pred = self.perfect_pred(batch) + 0.05 * torch.randn(4, 32, H, W, generator=torch.Generator().manual_seed(0))
        for max_pixels in (None, 100):
            for kmeans_seed in range(5):
                task = create_task("instances", self.info, max_pixels=max_pixels, kmeans_runs=3,
                                   kmeans_seed=kmeans_seed)
                out = self._metrics(task, [(pred, batch)])
                assert out["ari"] == pytest.approx(100.0) and out["n_eval_images"] == 4, (max_pixels, kmeans_seed)

    def test_kmeans_seed_and_runs_reach_kmeans(self):
        # ambiguous latents (noise): each seed's ARI equals the mean over runs r of a direct KMeans
        # with random_state seed·runs + r on every evaluated pixel (instance, foreground, not
        # ignored); different seeds share no run and disagree
        from sklearn.cluster import KMeans
        from sklearn.metrics import adjusted_rand_score

        batch = self.make_batch(np.random.default_rng(8), 1)
        pred = self.random_pred(self.make_task(), batch, seed=3)
        inst = batch["instances"][0].reshape(-1).astype(np.int64)
        keep = (inst > 0) & (batch["foreground"][0].reshape(-1) > 0) & (batch["instance_ignore"][0].reshape(-1) == 0)
        x = np.ascontiguousarray(pred[0].reshape(32, -1).numpy()[:, keep].T)
        aris = []
        for kmeans_seed in (0, 1, 2):
            task = create_task("instances", self.info, max_pixels=None, kmeans_runs=2, kmeans_seed=kmeans_seed)
            got = self._metrics(task, [(pred, batch)])["ari"]
            want = np.mean([adjusted_rand_score(inst[keep], KMeans(n_clusters=4, n_init=1, random_state=rs).fit_predict(x))
                            for rs in (2 * kmeans_seed, 2 * kmeans_seed + 1)])
            assert got == pytest.approx(100.0 * want, abs=1e-9)
            assert -100.0 <= got <= 100.0
            aris.append(got)
        assert len(set(aris)) > 1  # the seed changes the clustering, each result a valid ARI

    def test_options_record_the_estimator(self):
        task = create_task("instances", self.info)
        opts = task.options()
        assert {"max_pixels", "kmeans_runs", "kmeans_n_init", "kmeans_seed", "seed", "min_large", "large_area"} <= set(opts)
        # the estimator chosen in benchmarks/ari_noise.py (docs/instances.md)
        assert (opts["max_pixels"], opts["kmeans_runs"], opts["kmeans_n_init"], opts["kmeans_seed"]) == (5000, 64, 1, 0)
        other = create_task("instances", self.info, kmeans_seed=7, max_pixels=None, kmeans_runs=2, kmeans_n_init=5)
        assert {k: other.options()[k] for k in ("kmeans_seed", "max_pixels", "kmeans_runs", "kmeans_n_init")} == {
            "kmeans_seed": 7, "max_pixels": None, "kmeans_runs": 2, "kmeans_n_init": 5}
        for bad in ({"kmeans_runs": 0}, {"kmeans_n_init": 0}, {"max_pixels": 0}, {"kmeans_seed": -1}):
            with pytest.raises(ValueError):
                create_task("instances", self.info, **bad)


# ---- registry -----------------------------------------------------------------------------------


def test_registry_names_and_target_kinds():
    assert task_names() == ["boundaries", "depth", "distance", "instances", "semseg"]
    assert target_kind("semseg") == "semantic"
    assert tasks_for_targets(["instances"]) == ["boundaries", "distance", "instances"]
    assert tasks_for_targets(["semantic", "depth"]) == ["depth", "semseg"]
    with pytest.raises(UnknownNameError, match="semseg") as err:
        get_task("semsg")
    assert "boundaries" in str(err.value)


def test_learning_rates_follow_paper():
    assert {n: get_task(n).lr for n in task_names()} == {
        "boundaries": 2e-3,
        "depth": 2e-3,
        "distance": 1e-3,
        "instances": 1e-3,
        "semseg": 1e-3,
    }


def test_shape_mismatch_is_clear():
    task = create_task("depth", TargetInfo())
    with pytest.raises(ValueError, match="depth"):
        task.loss(torch.zeros(1, 1, 4, 4), {"depth": torch.ones(1, 3, 3)})


def test_target_info_round_trip():
    info = TargetInfo(num_classes=2, class_names=["a", "b"], num_instances=7)
    assert TargetInfo.from_dict(info.to_dict()) == info


def test_adjusted_rand_is_sklearns_bit_for_bit():
    from sklearn.metrics import adjusted_rand_score

    from probe.tasks.instances import adjusted_rand

    rng = np.random.default_rng(0)
    for trial in range(500):
        n = int(rng.integers(1, 200))
        true = rng.integers(0, int(rng.integers(1, 8)), n) * int(rng.integers(1, 5))
        pred = true.copy() if trial % 4 == 0 else rng.integers(0, int(rng.integers(1, 8)), n) - 2
        assert adjusted_rand(true, pred) == adjusted_rand_score(true, pred), (true, pred)


def test_instances_metric_does_not_depend_on_the_thread_count():
    rng = np.random.default_rng(1)
    inst = np.zeros((3, 48, 48), np.int64)
    for b in range(3):
        for k in range(1, 5):
            y, x = rng.integers(0, 36, 2)
            inst[b, y : y + 12, x : x + 12] = k
    batch = {"instances": torch.tensor(inst), "foreground": torch.tensor(inst > 0),
             "instance_ignore": torch.zeros(inst.shape, dtype=torch.bool), "large_count": torch.full((3,), 4)}
    latents = torch.tensor(rng.standard_normal((3, 32, 48, 48)), dtype=torch.float32) + 0.4 * batch["instances"][:, None]
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            task = create_task("instances", TargetInfo(num_instances=12), kmeans_runs=8, max_pixels=300)
            state = task.metric_state()
            task.update(state, latents, batch)
            results.append(task.compute(state)["ari"])
    finally:
        torch.set_num_threads(before)
    assert results[0] == results[1] == results[2] and 0 < results[0] < 100, results
