"""File system trouble gives one-line errors that name the path and the fix, never a traceback, and loses
nothing: a regular file where a store should be, a non-empty export folder, a symlinked part, a damaged
checkpoint, a store this user may not write to."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from conftest import write_tiny_store
from unipt.pipelines.cli import main
from unipt.store import FeatureStore

from test_recipes import tiny_overrides


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_extracting_into_a_regular_file_is_refused_and_the_file_kept(tiny_bert_dir, text_csv, tmp_path, capsys):
    target = tmp_path / "features.zarr"
    target.write_text("not a store")
    args = tiny_overrides(tiny_bert_dir, text_csv, tmp_path, ["unipt"])
    assert main(["extract", "tweets-minilm", "-q", *args]) == 2
    assert error_line(capsys) == (f"unipt extract: error: {target} is a file; a store is a folder (or prefix): "
                                  "choose a new or empty location")
    assert target.read_text() == "not a store"
    assert main(["store", "info", str(target)]) == 2
    assert "is a file, not a feature store" in error_line(capsys)


def test_export_into_a_non_empty_folder_is_a_one_line_error(tmp_path, capsys):
    store = write_tiny_store(str(tmp_path / "s.zarr"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(["store", "export", store.url, str(out), "-q"]) == 2
    assert "exists and is not an empty folder; export into a new folder" in error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_rm_part_refuses_a_symlinked_part_and_leaves_its_target(tmp_path, capsys):
    store = write_tiny_store(str(tmp_path / "s.zarr"))
    part = Path(store.url) / "train" / "part-000000"
    elsewhere = tmp_path / "elsewhere"
    part.rename(elsewhere)
    part.symlink_to(elsewhere, target_is_directory=True)
    assert main(["store", "rm-part", store.url, "train", "part-000000", "-q"]) == 2
    assert f"train/part-000000 in {store.url} is a symbolic link to {elsewhere}, not a part unipt wrote here" in \
        error_line(capsys)
    assert part.is_symlink() and (elsewhere / "zarr.json").is_file()


@pytest.fixture
def checkpoint(tmp_path):
    from unipt.train import LoaderConfig, TrainConfig, fit

    store = write_tiny_store(str(tmp_path / "s.zarr"))
    fit("probe", store, TrainConfig(method="linear_probe", epochs=1, batch_size=16, model={"layer": -1}),
        tmp_path / "ckpt", loader_config=LoaderConfig(mode="memory", background="off"), progress=False)
    return tmp_path / "ckpt" / "probe", store


@pytest.mark.parametrize("damage", ["truncated", "garbage", "deleted"])
def test_a_damaged_checkpoint_is_a_one_line_error(checkpoint, capsys, damage):
    folder, store = checkpoint
    weights = folder / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    else:
        weights.unlink()
    assert main(["eval", str(folder), "--store", store.url, "-q"]) == 2
    line = error_line(capsys)
    assert str(weights) in line or str(folder) in line
    assert "restore it or train again" in line


def test_a_store_this_user_may_not_write_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """A PermissionError from the store's writes (a read-only share) names the path and what to check."""
    import zarr.storage

    store = write_tiny_store(str(tmp_path / "s.zarr"))

    async def denied(self, key, *args, **kwargs):
        raise PermissionError(13, "Permission denied", os.path.join(str(self.root), key))

    monkeypatch.setattr(zarr.storage.LocalStore, "delete_dir", denied)
    assert main(["store", "rm-part", store.url, "train", "part-000000", "-q"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"unipt store: error: cannot delete train/part-000000 from {store.url}: Permission denied")
    assert re.search(r"; 0 of \d+ objects were deleted\. Check that this user may write to the store", line)
    assert FeatureStore.open(store.url).parts("train")  # nothing lost


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: the permission test needs another user")
def test_extracting_into_a_read_only_store_is_a_one_line_error(tiny_bert_dir, text_csv, tmp_path, capsys):
    args = tiny_overrides(tiny_bert_dir, text_csv, tmp_path, ["unipt"])
    assert main(["extract", "tweets-minilm", "-q", *args, "source.max_examples={train=40}"]) == 0
    root = tmp_path / "features.zarr"
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        assert main(["extract", "tweets-minilm", "-q", *args]) == 2
        assert "Permission denied" in error_line(capsys)
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
