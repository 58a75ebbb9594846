from __future__ import annotations

from pathlib import Path

import pytest

from noisy_student.io import atomic_path, write_json


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
