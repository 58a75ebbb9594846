"""Speed of the machinery against bare PyTorch, side by side in one process.

- training: ``engine.train_model`` (its batch plan, cosine schedule, loss bookkeeping and
  per-epoch logging) against a bare loop with the same model, optimizer, loss and the same
  strong augmentation (batched RandAugment);
- pseudo-labeling: ``pseudo_label`` (streaming inference, thresholding, soft labels) plus
  writing the parquet manifest, against a bare ``model(x)`` loop under
  ``torch.inference_mode()`` over the same tensors;
- augmentation: batched RandAugment against torchvision's v2 ``RandAugment`` image by
  image (``augment_speed.py``).

Runs alternate (project, bare, project, ...) and the median of ``--repeats`` is reported,
so drifting load hits both alike.

    python benchmarks/throughput.py --arch small_resnet --size 28 --channels 1
    python benchmarks/throughput.py --device cuda --arch resnet18 --size 32 --channels 3 \\
        --data-on-device --compile
    python benchmarks/throughput.py --skip train,augment --linear-labeler --pool-images 131072
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from augment_speed import measure as measure_augment
from torch import nn

from noisy_student.augment import build_augment
from noisy_student.engine import TrainData, TrainSettings, to_float, train_model, uses_bf16
from noisy_student.io import write_parquet
from noisy_student.losses import soft_cross_entropy
from noisy_student.models import build_model
from noisy_student.pseudo_label import one_hot, pseudo_label

LR, WEIGHT_DECAY = 0.05, 5e-4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def alternate(
    project: Callable[[], object], bare: Callable[[], object], device: torch.device, repeats: int
) -> tuple[float, float]:
    """Median seconds of each, after one warm-up run of each."""
    project(), bare()
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(project, device))
        b.append(timed(bare, device))
    return statistics.median(a), statistics.median(b)


def bare_train(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    augment: Callable,
    device: torch.device,
    batch_size: int,
) -> None:
    """The loop a PyTorch user writes: same optimizer, augmentation, loss and autocast."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=WEIGHT_DECAY
    )
    model.train()
    for index in torch.randperm(len(images)).split(batch_size):
        x = images[index.to(images.device)].to(device, non_blocking=True)
        y = targets[index].to(device, non_blocking=True)
        x, y = augment(x, y)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device)):
            logits = model(x)
        loss = soft_cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def bare_inference(
    model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int
) -> None:
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = to_float(images[start : start + batch_size], device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device)):
                model(x).float().cpu()


def print_profile(fn: Callable[[], object], device: torch.device) -> None:
    """torch.profiler's top ops of one run of ``fn``, by the time they take themselves."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
    for sort in ("self_cpu_time_total", "self_cuda_time_total")[: len(activities)]:
        print(prof.key_averages().table(sort_by=sort, row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="small_resnet")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3))
    parser.add_argument("--train-images", type=int, default=4096)
    parser.add_argument("--pool-images", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--label-batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-on-device", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument(
        "--linear-labeler",
        action="store_true",
        help="label with a linear model in place of the network: the gap to the bare loop "
        "is then the labeler's fixed cost per image, which a fast GPU model exposes",
    )
    parser.add_argument("--skip", default="", help="comma list of train,label,augment")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print torch.profiler's top ops of one training epoch and one labeling pass",
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    torch.manual_seed(0)
    device = torch.device(args.device)
    shape = (args.channels, args.size, args.size)
    home = device if args.data_on_device else torch.device("cpu")
    model = build_model(
        args.arch,
        num_classes=10,
        in_channels=args.channels,
        small_input=True,
        dropout=0.3,
        stochastic_depth=0.2,
    ).to(device, memory_format=torch.channels_last)  # the layout the engine trains in
    print(
        f"{args.arch} on {args.channels}x{args.size}x{args.size}, batch {args.batch}, device "
        f"{device}, data on {home}, channels_last, compile "
        f"{args.compile}, torch threads {torch.get_num_threads()}, {args.repeats} repeats"
    )
    print(f"{'':16}{'project img/s':>15}{'bare img/s':>13}{'ratio':>8}")

    def report(name: str, n: int, project_s: float, bare_s: float) -> None:
        ratio = bare_s / project_s
        print(f"{name:16}{n / project_s:15.0f}{n / bare_s:13.0f}{ratio:7.2f}x")

    if "train" not in skip:
        images = torch.randint(0, 256, (args.train_images, *shape), dtype=torch.uint8).to(home)
        targets = one_hot(np.random.default_rng(0).integers(0, 10, args.train_images), 10)
        data = TrainData(
            images,
            np.arange(args.train_images),
            targets,
            torch.ones(args.train_images, dtype=torch.bool),
        )
        augment = build_augment("strong", randaugment_ops=2, randaugment_magnitude=9)
        ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
        if args.compile:
            ours, theirs = torch.compile(ours), torch.compile(theirs)
        settings = TrainSettings(1, args.batch, LR, WEIGHT_DECAY)
        project_s, bare_s = alternate(
            lambda: train_model(ours, data, settings, augment, device),
            lambda: bare_train(theirs, images, targets, augment, device, args.batch),
            device,
            args.repeats,
        )
        report("training", args.train_images, project_s, bare_s)
        if args.profile:
            print_profile(lambda: train_model(ours, data, settings, augment, device), device)

    if "label" not in skip:
        pool = torch.randint(0, 256, (args.pool_images, *shape), dtype=torch.uint8).to(home)
        ids = np.arange(args.pool_images)
        labeler = model
        if args.linear_labeler:
            labeler = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), 10)).to(device)
            print(f"pseudo-labeling with a linear model in place of {args.arch}")
        labeler = torch.compile(labeler) if args.compile else labeler
        with tempfile.TemporaryDirectory() as tmp:
            manifest = Path(tmp) / "pseudo_labels.parquet"

            write_s = []  # the manifest's share of each project run

            def project() -> None:
                labels = pseudo_label(
                    labeler, pool, ids, device, threshold=0.0, batch_size=args.label_batch
                )
                write_s.append(timed(lambda: write_parquet(manifest, labels), device))

            project_s, bare_s = alternate(
                project,
                lambda: bare_inference(labeler, pool, device, args.label_batch),
                device,
                args.repeats,
            )
            if args.profile:
                print_profile(project, device)
        report("pseudo-labeling", args.pool_images, project_s, bare_s)
        write_us = statistics.median(write_s) / args.pool_images * 1e6
        print(f"{'':16}of which writing the manifest: {write_us:.2f} us per image")
        if args.linear_labeler:
            fixed_us = (project_s - bare_s) / args.pool_images * 1e6
            print(f"{'':16}labeler's cost over the bare loop: {fixed_us:.2f} us per image")

    if "augment" not in skip:
        batched, per_image = measure_augment(
            args.batch * 2, args.size, args.channels, args.repeats, 2, 9, device
        )
        print(
            f"{'RandAugment(2,9)':16}{batched:15.0f}{per_image:13.0f}{batched / per_image:7.2f}x"
            "  (bare = torchvision v2 per image on CPU)"
        )


if __name__ == "__main__":
    main()
