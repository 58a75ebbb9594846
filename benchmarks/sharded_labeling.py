"""Sharded labeling on Ray against the single process, on one machine, same model and pool.

``speed``: the pool labeled by one process (``pseudo_label`` + the manifest's write, as
``noisy-student pseudo-label`` does), then by ``--shards`` Ray tasks on a local Ray
instance of ``--cpus`` CPUs (each task: its slice of the manifest, the labeler, its part
and statistics) and the reduce; rounds alternate, figures are medians. The Ray instance
and its worker processes are started before timing (a cluster is up before a flow uses
it). ``memory``: a fresh process labels one shard of fixed size out of pools of growing
size and reports its peak resident memory: a shard's memory must follow the shard.

    python benchmarks/sharded_labeling.py speed --pool 200000 --shards 8
    python benchmarks/sharded_labeling.py memory --sizes 10000 1000000 --shard-size 10000
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pool_scale import PeakMemory, _status_kib, synthetic  # noqa: E402

CLASSES = 10


def _model():
    import torch

    from noisy_student.models import build_model

    torch.manual_seed(0)
    return build_model(
        "small_resnet", num_classes=CLASSES, in_channels=1, small_input=True, width=0.25
    )


def make_pool(folder: Path, n: int) -> Path:
    """Images in the on-disk layout (memory-mapped on read) and the pool's manifest."""
    from noisy_student.data.layout import write_layout

    write_layout(folder / "images", [str(c) for c in range(CLASSES)], synthetic(n))
    pool = pd.DataFrame({"image_id": np.arange(n), "hidden_label": np.full(n, -1)})
    pool.to_parquet(folder / "unlabeled.parquet", index=False)
    return folder


def label_shard(folder: Path, index: int, count: int, out: Path) -> dict:
    """One shard: its rows of the manifest, the labeler, its part and statistics."""
    import pyarrow.parquet as pq
    import torch

    from noisy_student.data.layout import read_layout
    from noisy_student.pseudo_label import pseudo_label
    from noisy_student.shards import Shard, read_rows, shard_stats, write_shard

    torch.set_num_threads(1)
    shard = Shard(index, count)
    rows = shard.rows(pq.ParquetFile(folder / "unlabeled.parquet").metadata.num_rows)
    pool = read_rows(folder / "unlabeled.parquet", *rows, ["image_id", "hidden_label"])
    images = read_layout(folder / "images").images
    ids = pool["image_id"].to_numpy()
    manifest = pseudo_label(_model(), images, ids, torch.device("cpu"), batch_size=1024)
    stats = shard_stats(manifest, pool["hidden_label"].to_numpy(), CLASSES, len(pool))
    write_shard(out, shard, manifest, stats, "bench", rows)
    return stats


def single(folder: Path, out: Path) -> float:
    import torch

    from noisy_student.data.layout import read_layout
    from noisy_student.io import write_parquet
    from noisy_student.pseudo_label import pseudo_label

    torch.set_num_threads(1)
    start = time.perf_counter()
    pool = pd.read_parquet(folder / "unlabeled.parquet")
    images = read_layout(folder / "images").images
    ids = pool["image_id"].to_numpy()
    manifest = pseudo_label(_model(), images, ids, torch.device("cpu"), batch_size=1024)
    write_parquet(out / "pseudo_labels.parquet", manifest)
    return time.perf_counter() - start


def sharded(folder: Path, out: Path, count: int) -> float:
    import ray

    from noisy_student.io import write_parquet
    from noisy_student.shards import read_shards, reduce_shards

    task = ray.remote(num_cpus=1)(label_shard)
    start = time.perf_counter()
    ray.get([task.remote(folder, i, count, out) for i in range(count)])
    n = len(pd.read_parquet(folder / "unlabeled.parquet", columns=["image_id"]))
    parts, stats = read_shards(out, count, "bench", n)
    manifest, _ = reduce_shards(parts, stats, CLASSES, None)
    write_parquet(out / "pseudo_labels.parquet", manifest)
    return time.perf_counter() - start


def speed(args: argparse.Namespace) -> None:
    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
    warm = ray.remote(num_cpus=1)(lambda: __import__("torch").get_num_threads())
    ray.get([warm.remote() for _ in range(args.cpus)])  # worker processes up, torch imported
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_pool(Path(tmp) / "pool", args.pool)
        times: dict[str, list[float]] = {"single": [], "ray": []}
        for r in range(args.repeats):
            times["single"].append(single(folder, Path(tmp) / f"single{r}"))
            times["ray"].append(sharded(folder, Path(tmp) / f"ray{r}", args.shards))
        a, b = (
            (Path(tmp) / "single0" / "pseudo_labels.parquet").read_bytes(),
            (Path(tmp) / "ray0" / "pseudo_labels.parquet").read_bytes(),
        )
    one, many = statistics.median(times["single"]), statistics.median(times["ray"])
    print(
        f"pool {args.pool}, {args.shards} shards on {args.cpus} Ray CPU(s), {args.repeats} rounds"
    )
    print(f"single process  {one:8.2f} s  {args.pool / one:9.0f} img/s")
    print(f"Ray, sharded    {many:8.2f} s  {args.pool / many:9.0f} img/s")
    print(f"throughput ratio (Ray / single): {one / many:.3f}; same manifest bytes: {a == b}")


def memory(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for n in args.sizes:
            folder = make_pool(Path(tmp) / str(n), n)
            peaks = []
            for _ in range(args.repeats):
                out = subprocess.run(
                    [sys.executable, __file__, "child", str(folder), str(n // args.shard_size)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                peaks.append(json.loads(out.splitlines()[-1])["peak_rss_mib"])
            rows.append((n, statistics.median_low(peaks), max(peaks) - min(peaks)))
    print(f"one shard of {args.shard_size} images, median of {args.repeats} fresh processes")
    for n, peak, spread in rows:
        print(
            f"pool {n:>9}  peak RSS {peak:7.1f} MiB (spread {spread:.1f})  "
            f"vs first {peak / rows[0][1] - 1:+.1%}"
        )


def child(folder: Path, count: int) -> None:
    sampler = PeakMemory()
    sampler.start()
    with tempfile.TemporaryDirectory() as out:
        label_shard(folder, 0, count, Path(out))
    sampler.running = False
    print(json.dumps({"peak_rss_mib": _status_kib("VmHWM") / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--pool", type=int, default=200_000)
    s.add_argument("--shards", type=int, default=8)
    s.add_argument("--cpus", type=int, default=1, help="Ray CPUs (1: same as the single process)")
    s.add_argument("--repeats", type=int, default=3)
    m = sub.add_parser("memory")
    m.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    m.add_argument("--shard-size", type=int, default=10_000)
    m.add_argument("--repeats", type=int, default=3)
    c = sub.add_parser("child")
    c.add_argument("folder", type=Path)
    c.add_argument("count", type=int)
    args = parser.parse_args()
    if args.command == "child":
        child(args.folder, args.count)
    else:
        {"speed": speed, "memory": memory}[args.command](args)


if __name__ == "__main__":
    main()
