"""Datasets (sources), their on-disk formats and the seeded splits."""

from noisy_student.data.sources import ImageSet, fetch, load_images
from noisy_student.data.splits import SPLITS, make_splits

__all__ = ["SPLITS", "ImageSet", "fetch", "load_images", "make_splits"]
