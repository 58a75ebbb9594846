from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.ops import StochasticDepth

from noisy_student.io import save_torch
from noisy_student.models import (
    ARCHS,
    backbone_parameters,
    build_model,
    head,
    load_checkpoint,
    num_parameters,
    save_checkpoint,
)


def test_width_and_depth_grow_the_model() -> None:
    base = num_parameters(build_model(num_classes=10, width=1.0, depth=1.0))
    assert num_parameters(build_model(num_classes=10, width=1.5, depth=1.0)) > base
    assert num_parameters(build_model(num_classes=10, width=1.0, depth=2.0)) > base


def test_noise_is_active_only_in_training() -> None:
    torch.manual_seed(0)
    model = build_model(num_classes=10, dropout=0.5, stochastic_depth=0.5)
    assert any(isinstance(m, StochasticDepth) and m.p > 0 for m in model.modules())
    x = torch.rand(8, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        outputs = [model(x) for _ in range(3)]
    assert not torch.equal(outputs[0], outputs[1]) or not torch.equal(outputs[1], outputs[2])


def test_noiseless_model_is_deterministic_in_training() -> None:
    model = build_model(num_classes=10).train()
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_checkpoint_round_trip_with_weights_only(tmp_path: Path) -> None:
    model = build_model(num_classes=4, in_channels=3, width=1.5, dropout=0.2).eval()
    save_torch(tmp_path / "m.pt", save_checkpoint(model))
    loaded = load_checkpoint(str(tmp_path / "m.pt")).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.config == model.config


SMALLEST = ("small_resnet", "resnet18", "efficientnet_b0")


@pytest.mark.parametrize("arch", SMALLEST)
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("small_input", [True, False])
def test_every_arch_takes_grey_and_colour_images(
    arch: str, in_channels: int, small_input: bool
) -> None:
    model = build_model(
        arch, num_classes=5, in_channels=in_channels, small_input=small_input
    ).eval()
    with torch.no_grad():
        assert model(torch.rand(2, in_channels, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("arch", SMALLEST)
def test_stochastic_depth_is_noise_only_in_training(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=5, in_channels=3, stochastic_depth=0.5, small_input=True)
    assert any(isinstance(m, StochasticDepth) and m.p > 0 for m in model.modules())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        outputs = [model(x) for _ in range(3)]
    assert not torch.equal(outputs[0], outputs[1]) or not torch.equal(outputs[1], outputs[2])


@pytest.mark.parametrize("arch", SMALLEST)
def test_dropout_is_noise_only_in_training(arch: str) -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    quiet = build_model(arch, num_classes=5, in_channels=3, small_input=True).train()
    with torch.no_grad():
        assert torch.equal(quiet(x), quiet(x))
    model = build_model(arch, num_classes=5, in_channels=3, dropout=0.5, small_input=True)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_small_input_stem_keeps_resolution() -> None:
    resnet = build_model("resnet18", num_classes=5, small_input=True)
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert isinstance(resnet.maxpool, torch.nn.Identity)
    effnet = build_model("efficientnet_b0", num_classes=5, in_channels=1, small_input=True)
    assert effnet.features[0][0].stride == (1, 1) and effnet.features[0][0].in_channels == 1
    imagenet = build_model("resnet18", num_classes=5)
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    small = build_model(num_classes=5, small_input=False)
    assert isinstance(small.stem[-1], torch.nn.MaxPool2d)


@pytest.mark.parametrize("arch", SMALLEST)
def test_every_arch_round_trips_through_a_checkpoint(arch: str, tmp_path: Path) -> None:
    model = build_model(arch, num_classes=4, in_channels=1, dropout=0.2, small_input=True)
    model.train()(torch.rand(4, 1, 32, 32))  # move the BatchNorm statistics off their init
    model.eval()
    save_torch(tmp_path / "m.pt", save_checkpoint(model))
    loaded = load_checkpoint(str(tmp_path / "m.pt")).eval()
    assert loaded.config == model.config and loaded.config["arch"] == arch
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_checkpoint_without_arch_loads_as_small_resnet(tmp_path: Path) -> None:
    model = build_model(num_classes=3)
    old_config = {k: v for k, v in model.config.items() if k not in ("arch", "small_input")}
    save_torch(tmp_path / "m.pt", {"config": old_config, "state_dict": model.state_dict()})
    assert load_checkpoint(str(tmp_path / "m.pt")).config == model.config


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "small_resnet"])
def test_torchvision_archs_keep_torchvision_layout(arch: str) -> None:
    """Same keys, shapes and size as torchvision's own model, so its weights load by name."""
    ours = build_model(arch, num_classes=1000)
    theirs = torchvision.models.get_model(arch, weights=None)
    assert num_parameters(ours) == num_parameters(theirs)
    shapes = {k: v.shape for k, v in theirs.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == shapes


def test_torchvision_archs_refuse_width_and_depth() -> None:
    with pytest.raises(ValueError, match="small_resnet"):
        build_model("resnet18", num_classes=10, width=2.0)
    with pytest.raises(ValueError, match="small_resnet"):
        build_model("efficientnet_b0", num_classes=10, depth=1.5)
    build_model("resnet18", num_classes=10, width=1.0, depth=1.0)


def test_unknown_arch_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("vgg11", num_classes=10)


@pytest.mark.parametrize("arch", SMALLEST)
def test_head_is_the_final_linear_and_backbone_the_rest(arch: str) -> None:
    model = build_model(arch, num_classes=7)
    classifier = head(model)
    assert isinstance(classifier, torch.nn.Linear) and classifier.out_features == 7
    backbone = {id(p) for p in backbone_parameters(model)}
    in_head = {id(p) for p in classifier.parameters()}
    assert not backbone & in_head
    assert backbone | in_head == {id(p) for p in model.parameters()}
