from __future__ import annotations

from pathlib import Path

import torch
from torchvision.ops import StochasticDepth

from noisy_student.io import save_torch
from noisy_student.models import build_model, load_checkpoint, num_parameters, save_checkpoint


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
