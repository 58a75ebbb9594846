"""Throughput of batched RandAugment against torchvision's per-image RandAugment.

The per-image loop is what a DataLoader does with ``v2.RandAugment`` in a Dataset; the
batched version is what the training loop does with a whole uint8 batch. Both run in this
process on the same batches, in alternating runs so drifting machine load hits both alike.

    python benchmarks/augment_speed.py --batch 256 --size 28 --channels 1 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torchvision.transforms import v2

from noisy_student.augment import BatchRandAugment


def _seconds(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Wall time of one call, waiting for queued CUDA work so the timing is complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(
    batch: int,
    size: int,
    channels: int,
    repeats: int,
    num_ops: int,
    magnitude: int,
    device: torch.device,
) -> tuple[float, float]:
    """Median images/s of batched RandAugment on ``device`` and of torchvision's
    RandAugment image by image on CPU, on the same random batch, alternating."""
    images = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8)
    on_device = images.to(device)
    batched = BatchRandAugment(num_ops, magnitude)
    per_image = v2.RandAugment(num_ops, magnitude)

    def run_batched() -> torch.Tensor:
        return batched(on_device)

    def run_per_image() -> torch.Tensor:
        return torch.stack([per_image(image) for image in images])

    run_batched(), run_per_image()  # warm-up: allocator, kernels, lazy imports
    batched_s, per_image_s = [], []
    for _ in range(repeats):
        batched_s.append(_seconds(run_batched, device))
        per_image_s.append(_seconds(run_per_image, torch.device("cpu")))
    return batch / statistics.median(batched_s), batch / statistics.median(per_image_s)


def main() -> None:
    """Time both ways, print the median images/s of each and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-ops", type=int, default=2)
    parser.add_argument("--magnitude", type=int, default=9)
    parser.add_argument(
        "--device", default="cpu", help="device of the batched run (the per-image one is CPU)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    batched_rate, per_image_rate = measure(
        args.batch, args.size, args.channels, args.repeats, args.num_ops, args.magnitude, device
    )
    print(
        f"batch {args.batch} x {args.channels} x {args.size} x {args.size}, "
        f"RandAugment({args.num_ops}, {args.magnitude}), {args.repeats} repeats, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"BatchRandAugment on {device}: {batched_rate:12.0f} images/s")
    print(f"v2.RandAugment per image on cpu: {per_image_rate:9.0f} images/s")
    print(f"speed-up: {batched_rate / per_image_rate:.1f}x")


if __name__ == "__main__":
    main()
