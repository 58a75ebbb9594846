"""Where pseudo-labeling's time goes, against the bare ``model(x)`` loop, in one process.

Each row adds one piece of the project's labeler to the loop before it, so the gaps
between rows are the costs of those pieces:

- ``bare``: ``model(x).float().cpu()`` per batch (throughput.py's baseline);
- ``bare, one copy``: the same, logits kept on the device and copied once at the end;
- ``stream``: the labeler's input path (``predict_logits_batches``: ids gathered on the
  device, eval mode, autocast), logits left on the device;
- ``stream + per-batch copies``: a softmax and three copies to the host per batch, the
  results handed on a batch behind (the labeler of commit 544190c);
- ``stream + chunks``: the softmax and the copies once per chunk (``in_chunks``: the
  labeler now);
- ``pseudo_label``: the library's labeler (thresholding, one frame at the end);
- ``pseudo_label + write``: and the parquet manifest.

Runs alternate and the median of ``--repeats`` is reported (after one warm-up of each).

    python benchmarks/label_phases.py --device cuda --pool-images 131072
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from throughput import bare_inference, timed

from noisy_student.engine import in_chunks, predict_logits_batches, to_float, uses_bf16
from noisy_student.io import write_parquet
from noisy_student.models import build_model
from noisy_student.pseudo_label import pseudo_label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pool-images", type=int, default=16384)
    parser.add_argument("--label-batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    device, n, batch = torch.device(args.device), args.pool_images, args.label_batch
    pool = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, device=device)
    ids = np.arange(n)
    model = build_model("small_resnet", num_classes=10, in_channels=1, small_input=True)
    model = model.to(device, memory_format=torch.channels_last).eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device))
    manifest = Path(tempfile.mkdtemp()) / "pseudo_labels.parquet"

    def stream() -> Iterator[torch.Tensor]:
        return predict_logits_batches(model, pool, device, batch, ids)

    @torch.inference_mode()
    def bare_one_copy() -> None:
        with autocast:
            logits = [
                model(to_float(pool[s : s + batch], device)).float() for s in range(0, n, batch)
            ]
        torch.cat(logits).cpu()

    def per_batch_copies() -> None:
        pending = None
        for logits in stream():
            probs = logits.softmax(dim=-1)
            on_host = [t.to("cpu", non_blocking=True) for t in (probs, *probs.max(dim=-1))]
            copied = torch.cuda.Event() if logits.is_cuda else None
            if copied is not None:
                copied.record()
            if pending is not None and pending[1] is not None:
                pending[1].synchronize()
            pending = on_host, copied

    def drain(batches: Iterator[torch.Tensor]) -> None:
        for _ in batches:
            pass

    def chunks() -> Iterator[torch.Tensor]:
        for logits in in_chunks(stream(), device):
            probs = logits.softmax(dim=-1)
            yield from (t.cpu() for t in (probs, *probs.max(dim=-1)))

    def labeler() -> None:
        pseudo_label(model, pool, ids, device, batch_size=batch)

    def labeler_and_write() -> None:
        write_parquet(manifest, pseudo_label(model, pool, ids, device, batch_size=batch))

    phases: dict[str, Callable[[], object]] = {
        "bare": lambda: bare_inference(model, pool, device, batch),
        "bare, one copy": bare_one_copy,
        "stream": lambda: drain(stream()),
        "stream + per-batch copies": per_batch_copies,
        "stream + chunks": lambda: drain(chunks()),
        "pseudo_label": labeler,
        "pseudo_label + write": labeler_and_write,
    }
    seconds: dict[str, list[float]] = {name: [] for name in phases}
    for fn in phases.values():
        fn()
    for _ in range(args.repeats):
        for name, fn in phases.items():
            seconds[name].append(timed(fn, device))
    bare = statistics.median(seconds["bare"])
    print(f"small_resnet on 1x28x28, {n} images, batch {batch}, device {device}, data on it")
    print(f"{'':28}{'img/s':>10}{'us/img':>9}{'vs bare':>9}")
    for name, runs in seconds.items():
        median = statistics.median(runs)
        print(f"{name:28}{n / median:10.0f}{median / n * 1e6:9.2f}{bare / median:8.2f}x")


if __name__ == "__main__":
    main()
