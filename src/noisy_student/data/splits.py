"""Seeded, stratified splits into labeled / unlabeled / val / test manifests."""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("labeled", "unlabeled", "val", "test")


def make_splits(
    labels: np.ndarray,
    labeled_per_class: int,
    val_per_class: int,
    test_per_class: int,
    seed: int,
) -> dict[str, pd.DataFrame]:
    """Per class: ``labeled_per_class`` labeled, then val, then test; the rest is the
    unlabeled pool, whose labels are kept as ``hidden_label`` only to score pseudo-labels."""
    rng = np.random.default_rng(seed)
    counts = {"labeled": labeled_per_class, "val": val_per_class, "test": test_per_class}
    ids: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        need = sum(counts.values())
        if len(members) <= need:
            raise ValueError(
                f"class {cls} has {len(members)} images; labeled + val + test per class "
                f"need {need} and the unlabeled pool at least one more"
            )
        start = 0
        for name, count in counts.items():
            ids[name].append(members[start : start + count])
            start += count
        ids["unlabeled"].append(members[start:])
    frames = {}
    for name in SPLITS:
        image_id = np.sort(np.concatenate(ids[name]))
        column = "hidden_label" if name == "unlabeled" else "label"
        frames[name] = pd.DataFrame({"image_id": image_id, column: labels[image_id]})
    return frames
