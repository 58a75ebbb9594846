from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from noisy_student import pipeline
from noisy_student.augment import build_augment
from noisy_student.config import Config, ConfigError, load_config
from noisy_student.consistency import (
    ClassThresholds,
    ConsistencySettings,
    fixmatch_loss,
    pseudo_targets,
    train_fixmatch,
)
from noisy_student.data import load_images
from noisy_student.engine import (
    TrainData,
    TrainingDiverged,
    TrainSettings,
    accuracy,
    predict_proba,
)
from noisy_student.io import read_json
from noisy_student.models import build_model, load_checkpoint
from noisy_student.pseudo_label import one_hot
from noisy_student.runs import HISTORY, MODEL, PER_CLASS, PSEUDO_LABELS, RunLayout
from tests.conftest import TINY
from tests.test_tracking import log, mlflow_store
from tests.test_tracking import tiny_config as tracked_config

pytestmark = pytest.mark.float_path  # `make test` runs it on both CPU float paths

FIXMATCH = {
    "teacher.method": "fixmatch",
    "teacher.epochs": 2,
    "teacher.unlabeled_ratio": 2.0,
    "teacher.threshold": 0.5,
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on shared cores train many times faster on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(tiny_config: Config, **changes: object) -> Config:
    overrides = {**TINY, "data.root": tiny_config.data.root, "device": "cpu", **FIXMATCH}
    return load_config(None, {**overrides, **changes}, max_iterations=1)


def test_fixmatch_teacher_writes_what_a_supervised_one_does_and_labels_the_pool(
    tiny_config: Config, tmp_path: Path
) -> None:
    supervised = load_config(
        None, {**TINY, "data.root": tiny_config.data.root, "device": "cpu", "teacher.epochs": 2}
    )
    # Every pool image labeled: a 2-epoch teacher's confidence says nothing here.
    fixmatch = _config(tiny_config, **{"pseudo_label.threshold": 0.0, "pseudo_label.balance": 5})
    runs = {}
    for name, cfg in (("supervised", supervised), ("fixmatch", fixmatch)):
        layout = RunLayout(tmp_path / name)
        pipeline.prepare(cfg, layout)
        pipeline.train(cfg, layout, 0)
        runs[name] = layout
    files = {name: sorted(p.name for p in r.model_dir(0).iterdir()) for name, r in runs.items()}
    assert files["fixmatch"] == files["supervised"]
    layout = runs["fixmatch"]
    metrics = read_json(layout.model_dir(0) / "metrics.json")
    assert metrics.keys() == read_json(runs["supervised"].model_dir(0) / "metrics.json").keys()
    assert metrics["num_pseudo_labeled"] == 0 and 0 <= metrics["test_accuracy"] <= 1
    history = pd.read_csv(layout.model_dir(0) / HISTORY)
    assert history["epoch"].tolist() == [1, 2]
    assert history["unlabeled_mask_rate"].between(0, 1).all()
    assert not pd.read_csv(layout.model_dir(0) / PER_CLASS).empty
    # The students train as before, from the fixmatch teacher's pseudo-labels.
    pipeline.label_pool(fixmatch, layout, 1)
    pipeline.train(fixmatch, layout, 1)
    assert len(pd.read_parquet(layout.pseudo_dir(1) / PSEUDO_LABELS)) > 0
    assert read_json(layout.model_dir(1) / "metrics.json")["teacher_iteration"] == 0


def test_weak_view_targets_are_masked_below_the_threshold() -> None:
    # Confidences 0.97 (class 0), 0.6 (class 1), 0.45 (class 2).
    probs = torch.tensor([[0.97, 0.02, 0.01], [0.2, 0.6, 0.2], [0.3, 0.25, 0.45]])
    predicted, confidence, mask = pseudo_targets(probs.log(), 0.95)
    assert predicted.tolist() == [0, 1, 2]
    assert torch.allclose(confidence, torch.tensor([0.97, 0.6, 0.45]))
    assert mask.tolist() == [True, False, False]
    # Per-class thresholds: the threshold of each row's predicted class applies.
    _, _, mask = pseudo_targets(probs.log(), torch.tensor([0.99, 0.5, 0.5]))
    assert mask.tolist() == [False, True, False]


def test_masked_rows_add_nothing_to_the_loss_or_its_gradient() -> None:
    torch.manual_seed(0)
    labeled, targets = torch.randn(4, 3), one_hot(torch.tensor([0, 1, 2, 0]).numpy(), 3)
    strong = torch.randn(5, 3, requires_grad=True)
    pseudo = torch.tensor([0, 1, 2, 1, 0])
    mask = torch.tensor([True, False, True, False, False])
    loss = fixmatch_loss(labeled, targets, strong, pseudo, mask, unlabeled_weight=2.0)
    loss.backward()
    assert (strong.grad[~mask] == 0).all() and (strong.grad[mask] != 0).any()
    # Masked rows still count in the mean, as in FixMatch.
    ce = torch.nn.functional.cross_entropy(strong.detach(), pseudo, reduction="none")
    unlabeled = (ce * mask).sum() / len(mask)
    supervised = torch.nn.functional.cross_entropy(labeled, targets.argmax(dim=1))
    assert torch.isclose(loss, supervised + 2.0 * unlabeled)
    alone = fixmatch_loss(labeled, targets, strong, pseudo, mask, unlabeled_weight=0.0)
    assert torch.isclose(alone, supervised)


def test_adaptive_thresholds_follow_each_class_learning_status() -> None:
    thresholds = ClassThresholds(pool_size=10, num_classes=3, threshold=0.9)
    # Warm-up: nothing is predicted yet, so no class looks learned.
    assert thresholds.thresholds().tolist() == [0.0, 0.0, 0.0]
    rows = torch.arange(10)
    classes = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    confidence = torch.tensor([0.95] * 8 + [0.5, 0.5])  # class 2's are below 0.9
    thresholds.update(rows, confidence, classes)
    # Class 0: 6 of the pool (the most learned), class 1: 2, class 2: none; 2 unused.
    assert torch.allclose(thresholds.status(), torch.tensor([1.0, 2 / 6, 0.0]))
    expected = [0.9, 0.9 * (1 / 3) / (2 - 1 / 3), 0.0]
    assert torch.allclose(thresholds.thresholds(), torch.tensor(expected))
    # A confident class-2 prediction for rows 8, 9 and rows 0-3 moving to class 1: the
    # statuses follow what the model now predicts.
    moved = torch.tensor([0, 1, 2, 3, 8, 9])
    thresholds.update(moved, torch.full((6,), 0.99), torch.tensor([1, 1, 1, 1, 2, 2]))
    assert torch.allclose(thresholds.status(), torch.tensor([2 / 6, 1.0, 2 / 6]))
    # While most of the pool is unpredicted, it is the denominator (FlexMatch's warm-up).
    warm = ClassThresholds(pool_size=10, num_classes=2, threshold=0.9)
    warm.update(torch.tensor([0, 1]), torch.tensor([0.95, 0.95]), torch.tensor([0, 0]))
    assert torch.allclose(warm.status(), torch.tensor([2 / 8, 0.0]))


def _digits_fixmatch(
    tiny_config: Config,
    layout: RunLayout,
    consistency: ConsistencySettings,
    epochs: int = 2,
    lr: float = 0.05,
):
    pipeline.prepare(tiny_config, layout)
    data = load_images("digits", tiny_config.data.root)
    labeled = pd.read_parquet(layout.splits / "labeled.parquet")
    pool = pd.read_parquet(layout.splits / "unlabeled.parquet")
    val = pd.read_parquet(layout.splits / "val.parquet")
    torch.manual_seed(0)
    model = build_model("small_resnet", num_classes=10, in_channels=1)
    kept, history = train_fixmatch(
        model,
        TrainData(
            data.images,
            labeled["image_id"].to_numpy(),
            one_hot(labeled["label"].to_numpy(), 10),
            torch.zeros(len(labeled), dtype=torch.bool),
        ),
        data.images,
        pool["image_id"].to_numpy(),
        TrainSettings(epochs=epochs, batch_size=16, lr=lr, weight_decay=5e-4),
        consistency,
        build_augment("weak"),
        build_augment("strong", randaugment_ops=2, randaugment_magnitude=5),
        torch.device("cpu"),
        val=(data.images, val["image_id"].to_numpy(), torch.tensor(val["label"].to_numpy())),
        pool_labels=torch.tensor(pool["hidden_label"].to_numpy()),
    )
    return model, kept, history, data, val


def test_the_moving_average_warms_up_then_decays_at_its_rate() -> None:
    """Update n uses min(decay, (1 + n) / (10 + n)): early weights fade within a short
    schedule instead of weighing 0.999^steps at the end."""
    from torch.optim.swa_utils import AveragedModel

    from noisy_student.consistency import ema_with_warmup

    model = torch.nn.BatchNorm1d(1)
    ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(0.9), use_buffers=True)
    expected = None
    for n in range(40):
        with torch.no_grad():
            model.weight.fill_(float(n))
        model.num_batches_tracked.fill_(n)
        ema.update_parameters(model)
        rate = min(0.9, (1 + n) / (10 + n))
        expected = float(n) if n == 0 else rate * expected + (1 - rate) * float(n)
        assert ema.module.weight.item() == pytest.approx(expected)
    assert ema.module.num_batches_tracked.item() == 39
    # At the decay's rate, an average of weights rising by 1 per update lags the last
    # by decay / (1 - decay) = 9 updates, less what the warm-up kept of the early ones.
    assert ema.module.weight.item() == pytest.approx(35.0)


def test_ema_weights_differ_from_the_trained_ones_and_are_the_model_kept(
    tiny_config: Config, tmp_path: Path
) -> None:
    settings = ConsistencySettings(unlabeled_ratio=2.0, threshold=0.5, ema_decay=0.9)
    raw, kept, history, data, val = _digits_fixmatch(tiny_config, RunLayout(tmp_path), settings)
    assert kept is not raw
    differ = [
        name
        for name, value in kept.state_dict().items()
        if value.is_floating_point() and not torch.equal(value, raw.state_dict()[name])
    ]
    assert differ
    # Validation scores the average, not the trained weights.
    probs = predict_proba(kept, data.images, torch.device("cpu"), ids=val["image_id"].to_numpy())
    assert history[-1]["val_accuracy"] == accuracy(probs, torch.tensor(val["label"].to_numpy()))
    assert 0 <= history[-1]["unlabeled_target_accuracy"] <= 1
    # Without the average the trained model is the one kept.
    off = ConsistencySettings(unlabeled_ratio=2.0, threshold=0.5)
    raw, kept, _, _, _ = _digits_fixmatch(tiny_config, RunLayout(tmp_path / "off"), off, 1)
    assert kept is raw


def test_a_process_group_of_one_trains_bit_for_bit_as_one_process(
    tiny_config: Config, tmp_path: Path
) -> None:
    """The data-parallel path (DDP, shared thresholds, the average) changes nothing for one
    process; tests/e2e/test_ddp.py runs two."""
    settings = ConsistencySettings(
        unlabeled_ratio=2.0, threshold=0.5, adaptive_threshold=True, ema_decay=0.9
    )
    _, plain, plain_history, _, _ = _digits_fixmatch(tiny_config, RunLayout(tmp_path), settings)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        layout = RunLayout(tmp_path / "group")
        _, ddp, ddp_history, _, _ = _digits_fixmatch(tiny_config, layout, settings)
    finally:
        dist.destroy_process_group()
    plain_state, ddp_state = plain.state_dict(), ddp.state_dict()
    assert plain_state.keys() == ddp_state.keys()
    assert all(torch.equal(plain_state[k], ddp_state[k]) for k in plain_state)
    timeless = [
        [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in history]
        for history in (plain_history, ddp_history)
    ]
    assert timeless[0] == timeless[1]


def test_a_diverging_loss_stops_the_teacher_with_a_clear_error(
    tiny_config: Config, tmp_path: Path
) -> None:
    settings = ConsistencySettings(unlabeled_ratio=1.0, threshold=0.5)
    with pytest.raises(TrainingDiverged, match=r"the train loss of epoch 1 is (nan|inf)"):
        _digits_fixmatch(tiny_config, RunLayout(tmp_path), settings, epochs=1, lr=1e30)


def test_pipeline_saves_and_labels_with_the_ema_model(
    tiny_config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    returned = []

    def spy(model, *args, **kwargs):
        kept, history = train_fixmatch(model, *args, **kwargs)
        returned.append((model, kept))
        return kept, history

    monkeypatch.setattr(pipeline, "train_fixmatch", spy)
    changes = {"teacher.ema_decay": 0.9, "teacher.adaptive_threshold": True}
    cfg = _config(tiny_config, **changes, **{"pseudo_label.threshold": 0.0})
    layout = RunLayout(tmp_path)
    pipeline.prepare(cfg, layout)
    pipeline.train(cfg, layout, 0)
    ((raw, kept),) = returned
    saved = load_checkpoint(str(layout.model_dir(0) / MODEL)).state_dict()
    assert all(torch.equal(saved[k], v.cpu()) for k, v in kept.state_dict().items())
    assert any(not torch.equal(saved[k], v.cpu()) for k, v in raw.state_dict().items())
    # The pool's pseudo-labels are the saved (average) model's predictions.
    pipeline.label_pool(cfg, layout, 1)
    manifest = pd.read_parquet(layout.pseudo_dir(1) / PSEUDO_LABELS)
    data = load_images("digits", cfg.data.root)
    probs = predict_proba(kept, data.images, torch.device("cpu"), ids=manifest["image_id"])
    assert (probs.argmax(dim=1).numpy() == manifest["label"].to_numpy()).all()


def test_fixmatch_config_is_validated() -> None:
    cfg = load_config(None, {"teacher.method": "fixmatch", "teacher.ema_decay": 0.999})
    assert cfg.teacher.method == "fixmatch" and cfg.teacher.unlabeled_ratio == 7.0
    with pytest.raises(ConfigError, match=r"teacher: augment: method 'fixmatch' .* got 'strong'"):
        load_config(None, {"teacher.method": "fixmatch", "teacher.augment": "strong"})
    with pytest.raises(ConfigError, match=r"teacher\.method: .*'supervised' or 'fixmatch'"):
        load_config(None, {"teacher.method": "mixmatch"})
    with pytest.raises(ConfigError, match=r"teacher: adaptive_threshold: .*'fixmatch'"):
        load_config(None, {"teacher.adaptive_threshold": True})
    with pytest.raises(ConfigError, match=r"teacher: ema_decay: .*allowed: 0"):
        load_config(None, {"teacher.ema_decay": 0.99})
    with pytest.raises(ConfigError, match=r"teacher\.threshold: .*1"):
        load_config(None, {"teacher.method": "fixmatch", "teacher.threshold": 1.5})
    with pytest.raises(ConfigError, match=r"teacher\.ema_decay: .*1"):
        load_config(None, {"teacher.method": "fixmatch", "teacher.ema_decay": 1.0})
    with pytest.raises(ConfigError, match=r"teacher\.unlabeled_ratio: .*0"):
        load_config(None, {"teacher.method": "fixmatch", "teacher.unlabeled_ratio": 0})


def test_mlflow_records_the_fixmatch_teacher_and_its_curves(
    tiny_config: Config, tmp_path: Path
) -> None:
    cfg = tracked_config(Path(tiny_config.data.root), **FIXMATCH)
    cfg = load_config(None, cfg.model_dump(mode="json"), max_iterations=0)
    layout = RunLayout(tmp_path / "run")
    pipeline.run_all(cfg, layout)
    with mlflow_store(tmp_path) as client:
        (teacher,) = log(client, cfg, layout).children
        params = teacher.data.params
        assert (params["method"], params["unlabeled_ratio"], params["threshold"]) == (
            "fixmatch",
            "2.0",
            "0.5",
        )
        assert (params["adaptive_threshold"], params["ema_decay"]) == ("False", "0.0")
        run_id = teacher.info.run_id
        curve = client.get_metric_history(run_id, "epoch/unlabeled_mask_rate")
        assert sorted(m.step for m in curve) == [1, 2]
