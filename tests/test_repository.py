"""The model repository's one rule for version folders, for reading (server, scoring) and writing (export, compose)
alike: REPO/NAME/N with N a positive integer without leading zeros; served once manifest.json is there; written
beside and renamed into place, never overwritten."""

from pathlib import Path

import pytest

from reskd.manifest import MANIFEST, ManifestError, ModelRepository, VersionExists


def layout(root: Path) -> ModelRepository:
    m = root / "m"
    for name in ("1", "2", "007", "0", "x", ".3-abc"):
        (m / name).mkdir(parents=True)
    (m / "1" / MANIFEST).write_text("{}")
    (m / "007" / MANIFEST).write_text("{}")
    (m / "0" / MANIFEST).write_text("{}")
    (m / "9").write_text("a file, not a version")
    return ModelRepository(root)


def test_versions_unfinished_and_next_follow_one_rule(tmp_path):
    repo = layout(tmp_path)
    assert repo.versions("m") == [1]  # 2 has no manifest; 007, 0, x and the dot folder are no version folders
    assert repo.unfinished_versions() == [tmp_path / "m" / "2"]
    assert [p.name for p in repo.folders("m")] == ["1", "2"]
    assert repo.next_version("m") == 3  # above the unfinished 2 too: writing it would collide
    assert repo.next_version("new") == 1
    assert repo.models() == ["m"]


def test_a_version_is_renamed_into_place_only_when_built(tmp_path):
    repo = ModelRepository(tmp_path / "r", create=True)

    def broken(folder: Path):
        (folder / "half.onnx").write_bytes(b"x")
        raise RuntimeError("parity failed")

    with pytest.raises(RuntimeError, match="parity failed"):
        repo.write_version("m", 1, broken)
    assert list((tmp_path / "r" / "m").iterdir()) == []  # neither the version nor its temporary folder

    def build(folder: Path):
        (folder / MANIFEST).write_text("{}")
        return "manifest"

    path, manifest = repo.write_version("m", 1, build)
    assert path == tmp_path / "r" / "m" / "1" and manifest == "manifest" and repo.versions("m") == [1]
    with pytest.raises(VersionExists, match="never overwritten"):
        repo.write_version("m", 1, build)
    with pytest.raises(ManifestError, match="positive integer"):
        repo.write_version("m", 0, build)


def test_a_missing_repository_is_refused_unless_created(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        ModelRepository(tmp_path / "absent")
    assert ModelRepository(tmp_path / "made", create=True).models() == []
