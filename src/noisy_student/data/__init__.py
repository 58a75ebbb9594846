"""Datasets (sources), their one on-disk layout and the seeded splits."""

from noisy_student.data.layout import PARTITIONS, Batch, ImageSet
from noisy_student.data.sources import SOURCES, fetch, load_images, source_options
from noisy_student.data.splits import SPLITS, make_splits

__all__ = [
    "PARTITIONS",
    "SOURCES",
    "SPLITS",
    "Batch",
    "ImageSet",
    "fetch",
    "load_images",
    "make_splits",
    "source_options",
]
