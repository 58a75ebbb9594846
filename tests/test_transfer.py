from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from noisy_student import transfer
from noisy_student.io import save_torch
from noisy_student.losses import soft_cross_entropy
from noisy_student.models import backbone_parameters, build_model, head, head_name, save_checkpoint
from noisy_student.transfer import apply_freeze, load_pretrained, optimizer_param_groups

pytestmark = pytest.mark.float_path  # `make test` runs it on both CPU float paths


def _trained_a_little(model: nn.Module, in_channels: int, size: int = 16) -> nn.Module:
    """Move the BatchNorm statistics off their initial values so copies are observable."""
    with torch.no_grad():
        model.train()(torch.rand(4, in_channels, size, size))
    return model.eval()


def _head_keys(model: nn.Module) -> set[str]:
    return {f"{head_name(model)}.{k}" for k in head(model).state_dict()}


def test_checkpoint_with_another_head_size_loads_all_but_the_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = _trained_a_little(build_model(num_classes=10, in_channels=1), 1)
    save_torch(tmp_path / "src.pt", save_checkpoint(source))
    torch.manual_seed(1)
    model = build_model(num_classes=4, in_channels=1)
    fresh_head = {k: v.clone() for k, v in head(model).state_dict().items()}

    report = load_pretrained(model, tmp_path / "src.pt")

    heads = _head_keys(model)
    assert report.head_replaced and set(report.skipped) == heads
    assert set(report.loaded) == set(source.state_dict()) - heads and not report.missing
    src, dst = source.state_dict(), model.state_dict()
    for key in report.loaded:
        assert torch.equal(dst[key], src[key]), key
    for key, value in head(model).state_dict().items():
        assert torch.equal(value, fresh_head[key])


def test_plain_state_dict_with_the_same_classes_loads_everything(tmp_path: Path) -> None:
    source = _trained_a_little(build_model(num_classes=3, in_channels=1), 1)
    save_torch(tmp_path / "sd.pt", source.state_dict())
    model = build_model(num_classes=3, in_channels=1)
    report = load_pretrained(model, str(tmp_path / "sd.pt"))
    assert not report.head_replaced and not report.skipped
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), source(x))


def test_colour_first_conv_is_summed_for_grey_input(tmp_path: Path) -> None:
    source = _trained_a_little(build_model(num_classes=3, in_channels=3), 3)
    save_torch(tmp_path / "rgb.pt", save_checkpoint(source))
    model = build_model(num_classes=3, in_channels=1)
    report = load_pretrained(model, tmp_path / "rgb.pt")
    assert report.adapted == ["stem.0.weight"]
    # A grey image through the summed conv gives what the colour model gives for it in RGB.
    grey = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(grey), source(grey.expand(-1, 3, -1, -1)))


def test_a_source_for_another_arch_is_refused(tmp_path: Path) -> None:
    save_torch(tmp_path / "r.pt", save_checkpoint(build_model("resnet18", num_classes=3)))
    with pytest.raises(ValueError, match="no tensor"):
        load_pretrained(build_model(num_classes=3), tmp_path / "r.pt")
    with pytest.raises(FileNotFoundError, match="torchvision:"):
        load_pretrained(build_model(num_classes=3), tmp_path / "absent.pt")


def test_loads_from_mlflow_run_and_registry_uris(tmp_path: Path) -> None:
    """The weights come from the project checkpoint logged beside the MLflow model
    (``checkpoint/model.pt``), as the records log every model."""
    import mlflow

    from noisy_student.tracking import _log_model, use_experiment
    from tests.test_tracking import mlflow_store

    source = _trained_a_little(build_model(num_classes=6, in_channels=1), 1)
    save_torch(tmp_path / "model.pt", save_checkpoint(source, [str(i) for i in range(6)], 16))
    with mlflow_store(tmp_path):
        use_experiment("t")
        with mlflow.start_run() as run:
            info = _log_model(tmp_path / "model.pt", (1, 16, 16))
        mlflow.register_model(info.model_uri, "tiny")
        for uri in (f"runs:/{run.info.run_id}/model", "models:/tiny/1"):
            model = build_model(num_classes=2, in_channels=1)
            report = load_pretrained(model, uri)
            assert report.head_replaced and set(report.skipped) == _head_keys(model)
            for key in report.loaded:
                assert torch.equal(model.state_dict()[key], source.state_dict()[key]), key


def test_torchvision_weights_fail_fast_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    if transfer._reachable(*transfer._download_host()):
        pytest.skip("download.pytorch.org is reachable: the offline error cannot happen here")
    model = build_model("resnet18", num_classes=5)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="cannot be downloaded here") as error:
        load_pretrained(model, "torchvision:IMAGENET1K_V1")
    assert time.perf_counter() - start < 10
    assert "state_dict" in str(error.value) and "resnet18-" in str(error.value)


def test_torchvision_weights_load_from_the_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(transfer, "_reachable", lambda *a, **k: pytest.fail("went to network"))
    imagenet = torchvision.models.resnet18()
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    save_torch(tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1], imagenet.state_dict())

    model = build_model("resnet18", num_classes=5, in_channels=1)
    report = load_pretrained(model, "torchvision:IMAGENET1K_V1")

    assert report.head_replaced and report.adapted == ["conv1.weight"]
    assert torch.equal(model.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight.sum(dim=1, keepdim=True))


def test_torchvision_source_needs_a_torchvision_arch_and_known_weights() -> None:
    with pytest.raises(ValueError, match="no torchvision weights"):
        load_pretrained(build_model(num_classes=3), "torchvision:IMAGENET1K_V1")
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        load_pretrained(build_model("resnet18", num_classes=3), "torchvision:NOPE")


def _train_steps(model: nn.Module, groups: list[dict], steps: int = 3) -> None:
    """The engine's loop in miniature: train mode, forward, soft CE, backward, step."""
    optimizer = torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        apply_freeze(model.train())
        x = torch.rand(8, 1, 16, 16, generator=generator)
        y = torch.eye(4)[torch.randint(0, 4, (8,), generator=generator)]
        loss = soft_cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["small_resnet", "resnet18"])
def test_freeze_trains_the_head_only(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=4, in_channels=1, dropout=0.2, stochastic_depth=0.2)
    groups = optimizer_param_groups(model, "freeze", lr=0.1)
    assert len(groups) == 1 and groups[0]["lr"] == 0.1
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in head(model).parameters()}
    assert not any(p.requires_grad for p in backbone_parameters(model))
    before = _snapshot(model)

    _train_steps(model, groups)

    after, heads = model.state_dict(), _head_keys(model)
    for key in before.keys() - heads:  # weights and BatchNorm buffers alike
        assert torch.equal(after[key], before[key]), key
    assert all(not torch.equal(after[key], before[key]) for key in heads)


def test_without_apply_freeze_batchnorm_statistics_would_move() -> None:
    model = build_model(num_classes=4, in_channels=1)
    optimizer_param_groups(model, "freeze", lr=0.1)
    before = model.stem[1].running_mean.clone()
    with torch.no_grad():
        model.train()(torch.rand(4, 1, 16, 16))
    assert not torch.equal(model.stem[1].running_mean, before)


def test_finetune_trains_backbone_slower_and_head() -> None:
    torch.manual_seed(0)
    model = build_model(num_classes=4, in_channels=1)
    optimizer_param_groups(model, "freeze", lr=0.1)  # the mode alone decides what trains
    groups = optimizer_param_groups(model, "finetune", lr=0.1, backbone_lr_scale=0.1)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert groups[0]["lr"] == pytest.approx(0.01) and groups[1]["lr"] == 0.1
    assert all(p.requires_grad for p in model.parameters())
    before = _snapshot(model)

    _train_steps(model, groups)

    after, heads = model.state_dict(), _head_keys(model)
    assert not torch.equal(after["stem.0.weight"], before["stem.0.weight"])
    assert not torch.equal(after["stem.1.running_mean"], before["stem.1.running_mean"])
    assert all(not torch.equal(after[key], before[key]) for key in heads)


def test_scratch_is_one_group_with_everything() -> None:
    model = build_model(num_classes=4)
    groups = optimizer_param_groups(model, "scratch", lr=0.05)
    assert len(groups) == 1 and groups[0]["lr"] == 0.05
    assert len(groups[0]["params"]) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="mode"):
        optimizer_param_groups(model, "linear-probe", lr=0.1)  # type: ignore[arg-type]
