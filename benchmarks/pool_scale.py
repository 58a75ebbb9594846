"""Pseudo-labeling streams: peak memory stays flat and time grows linearly with the pool.

For each pool size, synthetic 28x28 images are written to the on-disk layout every source
uses (memory-mapped on read), then a fresh process labels the whole pool with the
project's labeler (``pseudo_label``, soft labels) and writes the manifest, as
``noisy-student pseudo-label`` does. A sampler thread reads ``/proc/self/status`` to record
the process's peak resident memory, split into anonymous memory (what the process holds)
and file-backed pages (the mapped images, which the kernel can drop at will). Sizes run
in alternating rounds (``--repeats``) and each figure is the median over rounds: a fresh
process's peak varies by tens of MiB from run to run, as much as the effect measured.

    python benchmarks/pool_scale.py --sizes 10000 200000
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

CHUNK = 10_000


def synthetic(n: int, seed: int = 0) -> Iterator:
    from noisy_student.data.layout import Batch

    rng = np.random.default_rng(seed)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        yield Batch(
            "unlabeled",
            rng.integers(0, 256, (m, 1, 28, 28), dtype=np.uint8),
            np.full(m, -1),
            rng.integers(0, 10, m),
        )


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakMemory(threading.Thread):
    """Peak anonymous and file-backed resident memory, sampled every 10 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.anon = self.file = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            self.anon = max(self.anon, _status_kib("RssAnon"))
            self.file = max(self.file, _status_kib("RssFile"))
            time.sleep(0.01)


def label(folder: Path, batch_size: int) -> dict:
    """Label the pool in ``folder`` (child process); return time and memory figures."""
    import torch

    from noisy_student.data.layout import read_layout
    from noisy_student.io import write_parquet
    from noisy_student.models import build_model
    from noisy_student.pseudo_label import pseudo_label

    torch.manual_seed(0)
    # A narrow model: what is measured is the streaming around it, not its arithmetic.
    model = build_model("small_resnet", num_classes=10, in_channels=1, small_input=True, width=0.25)
    data = read_layout(folder)
    ids = np.arange(len(data.labels))
    sampler = PeakMemory()
    sampler.start()
    start = time.perf_counter()
    manifest = pseudo_label(
        model, data.images, ids, torch.device("cpu"), threshold=0.0, batch_size=batch_size
    )
    write_parquet(folder.parent / "pseudo_labels.parquet", manifest)
    seconds = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    return {
        "pool": len(ids),
        "seconds": seconds,
        "peak_rss_mib": _status_kib("VmHWM") / 1024,
        "peak_anon_mib": sampler.anon / 1024,
        "peak_file_mib": sampler.file / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 200_000])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the sizes")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(label(args.child, args.batch)))
        return

    from noisy_student.data.layout import write_layout

    runs: dict[int, list[dict]] = {n: [] for n in args.sizes}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for n in args.sizes:
            folders[n] = Path(tmp) / str(n) / "pool"
            write_layout(folders[n], [str(c) for c in range(10)], synthetic(n))
        for _ in range(args.repeats):
            for n in args.sizes:
                child = ["--child", str(folders[n]), "--batch", str(args.batch)]
                out = subprocess.run(
                    [sys.executable, __file__, *child], check=True, capture_output=True, text=True
                ).stdout
                runs[n].append(json.loads(out.splitlines()[-1]))
    # median_low: with an even number of rounds each figure is still one measured run's.
    rows = []
    for n in args.sizes:
        peaks = [r["peak_rss_mib"] for r in runs[n]]
        row = {key: statistics.median_low(r[key] for r in runs[n]) for key in runs[n][0]}
        rows.append(row | {"rss_spread_mib": max(peaks) - min(peaks)})
    base = rows[0]
    print(f"median of {args.repeats} fresh processes per size")
    header = (
        f"{'pool':>9}{'seconds':>9}{'µs/img':>8}{'peak RSS':>10}{'spread':>8}{'anon':>8}{'file':>8}"
    )
    print(f"{header}  vs first")
    for r in rows:
        print(
            f"{r['pool']:9d}{r['seconds']:9.1f}{1e6 * r['seconds'] / r['pool']:8.0f}"
            f"{r['peak_rss_mib']:8.0f}Mi{r['rss_spread_mib']:6.0f}Mi"
            f"{r['peak_anon_mib']:6.0f}Mi{r['peak_file_mib']:6.0f}Mi"
            f"  RSS {r['peak_rss_mib'] / base['peak_rss_mib'] - 1:+.1%}, "
            f"anon {r['peak_anon_mib'] / base['peak_anon_mib'] - 1:+.1%}, "
            f"time/img {r['seconds'] / r['pool'] / (base['seconds'] / base['pool']):.2f}x"
        )


if __name__ == "__main__":
    main()
