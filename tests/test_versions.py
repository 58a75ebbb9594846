from __future__ import annotations

from pathlib import Path

from noisy_student import versions


def test_code_version_changes_with_the_source(tmp_path: Path, monkeypatch) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(versions, "PACKAGE", package)
    versions.code_version.cache_clear()
    before = versions.code_version()
    (package / "a.py").write_text("x = 2\n")
    versions.code_version.cache_clear()
    assert versions.code_version() != before
    versions.code_version.cache_clear()


def test_data_version_reads_data_dvc(tmp_path: Path) -> None:
    dvc_file = tmp_path / "data.dvc"
    assert versions.data_version(dvc_file) == ""
    dvc_file.write_text("outs:\n- md5: abc.dir\n  path: data\n")
    assert versions.data_version(dvc_file) == "abc.dir"
