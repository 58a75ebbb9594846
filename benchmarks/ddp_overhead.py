"""What the data-parallel path costs a single process: ``engine.train_model`` inside a
one-process ``torch.distributed`` group (DDP wrapper, gradient all-reduce, plan sharding,
loss and validation reductions) against the same call with no group (the plain loop),
same model, data and seed. Runs alternate (plain, DDP, plain, ...) and the median of
``--repeats`` is reported, so drifting load hits both alike. The ratio is DDP / plain
images per second (target >= 0.97). ``--method fixmatch`` measures the FixMatch teacher's
loop the same way (``consistency.train_fixmatch``, 2 pool images per labeled one, FlexMatch
thresholds gathered over the ranks and a moving average on); its images/s count the
labeled images.

    python benchmarks/ddp_overhead.py
    python benchmarks/ddp_overhead.py --method fixmatch
    python benchmarks/ddp_overhead.py --device cuda --arch resnet18 --size 32 --channels 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from noisy_student.augment import build_augment
from noisy_student.consistency import ConsistencySettings, train_fixmatch
from noisy_student.engine import TrainData, TrainSettings, train_model
from noisy_student.models import build_model
from noisy_student.pseudo_label import one_hot


def _data(n: int, size: int, channels: int, classes: int = 10) -> TrainData:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8))
    return TrainData(
        images,
        np.arange(n),
        one_hot(rng.integers(0, classes, n), classes),
        torch.zeros(n, dtype=torch.bool),
    )


def _run(args: argparse.Namespace, data: TrainData, device: torch.device) -> float:
    """Images per second of one training epoch (after one warm-up epoch)."""
    torch.manual_seed(0)
    size = {"width": 1.0, "depth": 1.0} if args.arch == "small_resnet" else {}
    model = build_model(
        args.arch,
        num_classes=10,
        in_channels=args.channels,
        small_input=True,
        dropout=0.3,
        stochastic_depth=0.2,
        **size,
    )
    strong = build_augment("strong", randaugment_ops=2, randaugment_magnitude=9)
    settings = TrainSettings(2, args.batch_size, 0.05, 5e-4)
    if args.method == "fixmatch":
        consistency = ConsistencySettings(2.0, 0.95, adaptive_threshold=True, ema_decay=0.999)
        pool = np.arange(len(data))
        weak = build_augment("weak")
        _, history = train_fixmatch(
            model, data, data.images, pool, settings, consistency, weak, strong, device
        )
    else:
        history = train_model(model, data, settings, strong, device)
    return len(data) / history[-1]["epoch_seconds"]


def _in_group(args: argparse.Namespace, data: TrainData, device: torch.device) -> float:
    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        store = f"file://{Path(tmp) / 'store'}"
        dist.init_process_group(backend, init_method=store, rank=0, world_size=1)
        try:
            return _run(args, data, device)
        finally:
            dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--method", choices=("supervised", "fixmatch"), default="supervised")
    parser.add_argument("--arch", default="small_resnet")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    data = _data(args.images, args.size, args.channels)
    plain, ddp = [], []
    for _ in range(args.repeats):
        plain.append(_run(args, data, device))
        ddp.append(_in_group(args, data, device))
        print(f"plain {plain[-1]:8.1f} img/s   DDP world size 1 {ddp[-1]:8.1f} img/s", flush=True)
    p, d = statistics.median(plain), statistics.median(ddp)
    print(
        f"median of {args.repeats}: plain {p:.1f} img/s, DDP {d:.1f} img/s, ratio {d / p:.3f}x "
        f"({torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')})"
    )


if __name__ == "__main__":
    main()
