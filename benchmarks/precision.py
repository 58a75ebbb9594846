"""What bf16 autocast buys on this machine: ``engine.train_model`` (the students' noised
training step) and ``pseudo_label`` (the labeler) with the models' forwards in fp32 against
the same calls in bf16 (``engine.precision``), same model, data and seed. Runs alternate
(fp32, bf16, fp32, ...) and the median of ``--repeats`` is reported, so drifting load hits
both alike; the ratios are bf16 / fp32 images per second. It also reports how many of the
pool's labels a trained model gives alike in both precisions, and whether this CPU is
one that ``precision: auto`` runs in bf16 (AVX512-BF16 or AMX).

    python benchmarks/precision.py
    python benchmarks/precision.py --device cuda --arch resnet18 --size 32 --channels 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from noisy_student.augment import build_augment
from noisy_student.engine import (
    TrainData,
    TrainSettings,
    cpu_has_native_bf16,
    precision,
    train_model,
)
from noisy_student.models import build_model
from noisy_student.pseudo_label import one_hot, pseudo_label

PRECISIONS = ("fp32", "bf16")


def _data(n: int, size: int, channels: int, classes: int = 10) -> TrainData:
    """Images with a learnable label (the class sets the mean brightness), so a trained
    model's labels say something about agreement."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, n)
    base = (labels * (200 // classes))[:, None, None, None]
    noise = rng.integers(0, 56, (n, channels, size, size))
    images = torch.from_numpy((base + noise).astype(np.uint8))
    return TrainData(
        images, np.arange(n), one_hot(labels, classes), torch.zeros(n, dtype=torch.bool)
    )


def _model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    size = {"width": 1.0, "depth": 1.0} if args.arch == "small_resnet" else {}
    return build_model(
        args.arch,
        num_classes=10,
        in_channels=args.channels,
        small_input=True,
        dropout=0.3,
        stochastic_depth=0.2,
        **size,
    )


def _train(args: argparse.Namespace, data: TrainData, device: torch.device, name: str) -> float:
    """Training images per second of the second of two epochs."""
    strong = build_augment("strong", randaugment_ops=2, randaugment_magnitude=7)
    with precision(name):
        history = train_model(
            _model(args), data, TrainSettings(2, args.batch_size, 0.05, 5e-4), strong, device
        )
    return len(data) / history[-1]["epoch_seconds"]


def _label(model: torch.nn.Module, data: TrainData, device: torch.device, name: str):
    """(images per second, the hard labels) of labeling every image with flip averaging."""
    ids = np.arange(len(data))
    with precision(name):
        start = time.perf_counter()
        manifest = pseudo_label(model, data.images, ids, device, mode="hard", hflip=True)
        seconds = time.perf_counter() - start
    return len(ids) / seconds, manifest["label"].to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="small_resnet")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    data = _data(args.images, args.size, args.channels)
    train = {name: [] for name in PRECISIONS}
    for _ in range(args.repeats):
        for name in PRECISIONS:
            train[name].append(_train(args, data, device, name))
        print(f"training  fp32 {train['fp32'][-1]:7.1f} img/s  bf16 {train['bf16'][-1]:7.1f} img/s")
    trained = _model(args)
    with precision("fp32"):
        train_model(
            trained,
            data,
            TrainSettings(2, args.batch_size, 0.05, 5e-4),
            build_augment("weak"),
            device,
        )
    label = {name: [] for name in PRECISIONS}
    labels = {}
    for _ in range(args.repeats):
        for name in PRECISIONS:
            speed, labels[name] = _label(trained, data, device, name)
            label[name].append(speed)
        print(f"labeling  fp32 {label['fp32'][-1]:7.1f} img/s  bf16 {label['bf16'][-1]:7.1f} img/s")
    agree = float((labels["fp32"] == labels["bf16"]).mean())
    for step, runs in (("training", train), ("labeling", label)):
        fp32, bf16 = statistics.median(runs["fp32"]), statistics.median(runs["bf16"])
        print(
            f"median of {args.repeats}, {step}: fp32 {fp32:.1f} img/s, bf16 {bf16:.1f} img/s, "
            f"ratio {bf16 / fp32:.3f}x"
        )
    print(
        f"labels alike in both precisions: {agree:.4f}; native bf16 on this CPU: "
        f"{cpu_has_native_bf16()} ({torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')})"
    )


if __name__ == "__main__":
    main()
