"""Seeded, stratified splits into labeled / unlabeled / val / test manifests."""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("labeled", "unlabeled", "val", "test")


def make_splits(
    labels: np.ndarray,
    labeled_per_class: int | None,
    val_per_class: int,
    test_per_class: int,
    seed: int,
    *,
    partition: np.ndarray | None = None,
    hidden_labels: np.ndarray | None = None,
    class_names: list[str] | None = None,
) -> dict[str, pd.DataFrame]:
    """Per class of the "train" partition: ``labeled_per_class`` labeled, then val, then
    test; the rest joins the "unlabeled" partition in the unlabeled pool. The pool's labels
    (the train label, else ``hidden_labels``; -1 when unknown) are kept as ``hidden_label``
    only to score pseudo-labels. A source's own "val" or "test" partition, when it has one,
    is that split whole, and nothing is drawn from "train" for it. ``labeled_per_class``
    None labels every "train" image that val and test do not take (a user's own labels).

    Without ``partition`` every image is "train", and the split is the same as it has
    always been for the same seed. ``class_names`` name a class too small in the error."""
    labels = np.asarray(labels)
    if partition is None:
        partition = np.full(len(labels), "train")
    if hidden_labels is None:
        hidden_labels = np.full(len(labels), -1)
    train = partition == "train"
    given = {name: np.flatnonzero(partition == name) for name in ("val", "test")}
    counts = {"labeled": labeled_per_class or 0}
    for name, per_class in (("val", val_per_class), ("test", test_per_class)):
        if not given[name].size:
            counts[name] = per_class
    outside = np.flatnonzero(partition == "unlabeled")
    classes = np.unique(labels[train])
    if not classes.size:
        raise ValueError("no image in the train partition to draw labeled images from")
    for name, ids in given.items():
        missing = sorted(set(labels[ids].tolist()) - set(classes.tolist()))
        if missing:
            named = [class_names[c] for c in missing] if class_names else missing
            raise ValueError(f"the {name} partition has classes {named} with no train image")
    rng = np.random.default_rng(seed)
    ids: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for cls in classes:
        members = rng.permutation(np.flatnonzero(train & (labels == cls)))
        # The pool must not be empty: with no "unlabeled" partition, each class leaves one.
        spare = 0 if outside.size else 1
        if labeled_per_class is None:  # every image val and test leave, at least one
            drawn = sum(count for name, count in counts.items() if name != "labeled")
            counts["labeled"] = max(1, len(members) - spare - drawn)
        need = sum(counts.values())
        if len(members) < need + spare:
            name = repr(class_names[cls]) if class_names is not None else str(cls)
            raise ValueError(
                f"class {name} has {len(members)} images in the train partition; "
                f"{' + '.join(counts)} per class need {need}"
                + (" and the unlabeled pool at least one more" if spare else "")
            )
        start = 0
        for name, count in counts.items():
            ids[name].append(members[start : start + count])
            start += count
        ids["unlabeled"].append(members[start:])
    for name, chosen in given.items():
        ids[name].append(chosen)
    ids["unlabeled"].append(outside)
    frames = {}
    for name in SPLITS:
        image_id = np.sort(np.concatenate(ids[name]))
        if name == "unlabeled":
            hidden = labels[image_id].copy()
            pooled = partition[image_id] == "unlabeled"
            hidden[pooled] = hidden_labels[image_id][pooled]
            frames[name] = pd.DataFrame({"image_id": image_id, "hidden_label": hidden})
        else:
            frames[name] = pd.DataFrame({"image_id": image_id, "label": labels[image_id]})
    return frames
