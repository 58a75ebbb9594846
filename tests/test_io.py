from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from noisy_student.io import atomic_path, write_json, write_parquet


def test_crash_leaves_previous_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json(target, {"ok": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half-writ")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == '{\n  "ok": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_crash_before_first_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "sub" / "model.pt") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError
    assert list((tmp_path / "sub").iterdir()) == []


def test_parquet_round_trips_columns_and_dtypes(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "image_id": np.arange(5),
            "label": np.array([0, 3, 3, 1, 0]),
            "prob_0": np.linspace(0, 1, 5, dtype=np.float32),
        }
    )
    write_parquet(tmp_path / "m.parquet", frame)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "m.parquet"), frame)
