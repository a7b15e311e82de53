"""Eight `unipt extract` processes started together on one store over S3 share its parts: each part is
committed by exactly one of them, and the store equals one written by a single run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import assert_same_parts, make_text_csv, make_tiny_bert
from unipt.extract import BackboneConfig, ExtractConfig, SourceConfig, run_extraction
from unipt.pipelines.cli import main
from unipt.store import FeatureStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))  # tests/store: the S3 endpoint helper
from s3_server import moto_s3  # noqa: E402

WRITERS = 8
PART_SIZE = 8  # 192 texts: about 26 parts over the three splits
BATCH_SIZE = 8

# The real command line (`unipt extract`), behind a start line: the process imports the extraction stack,
# says so with its "ready" file and waits for the "go" file, so all eight reach the store within
# milliseconds of each other instead of one finishing its imports (seconds) before the others.
RUN = r"""
import os, sys, time
import torch, transformers
from transformers import BertModel, BertTokenizerFast
import unipt.extract, unipt.store
from unipt.pipelines.cli import main
go, ready = sys.argv[1:3]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
sys.exit(main(sys.argv[3:]))
"""

RECIPE = """\
name = "many-writers"
store = "{store}"
[source]
path = "{csv}"
[backbone]
model = "{model}"
device = "cpu"
[extract]
part_size = {part_size}
batch_size = {batch_size}
[train.probe]
method = "linear_probe"
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        with moto_s3(monkeypatch, tmp_path_factory.mktemp("aws"), bucket="unipt-many-writers") as endpoint:
            yield endpoint


def start_writers(tmp_path: Path, recipe: Path, n: int) -> list[subprocess.Popen]:
    go = tmp_path / "go"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    ready = [tmp_path / f"ready-{i}" for i in range(n)]
    runs = [subprocess.Popen([sys.executable, "-c", RUN, str(go), str(flag), "extract", str(recipe), "-q",
                              f"workdir='{tmp_path / f'work-{i}'}'", "--summary-json", str(tmp_path / f"summary-{i}.json")],
                             # a file, not a pipe: eight pipes read one after another could fill and stall a writer
                             env=env, stdout=open(tmp_path / f"writer-{i}.log", "w"), stderr=subprocess.STDOUT)
            for i, flag in enumerate(ready)]
    deadline = time.monotonic() + 240  # the first import in a fresh environment compiles every module
    while not all(flag.exists() for flag in ready):
        if time.monotonic() > deadline or any(run.poll() is not None for run in runs):
            for run in runs:
                run.kill()
            pytest.fail("a writer did not start: " + writer_logs(tmp_path, n))
        time.sleep(0.05)
    go.touch()
    return runs


def writer_logs(tmp_path: Path, n: int) -> str:
    return "".join((tmp_path / f"writer-{i}.log").read_text()[-2000:] for i in range(n))


def test_eight_writers_on_s3_commit_every_part_once_and_give_the_one_writer_store(s3, tmp_path, capsys):
    model = make_tiny_bert(tmp_path / "tiny-bert", layers=1)
    csv = make_text_csv(tmp_path / "texts.csv", n=192)
    reference_url = str(tmp_path / "reference.zarr")
    run_extraction(SourceConfig(path=str(csv)), BackboneConfig(model=str(model), device="cpu"),
                   ExtractConfig(part_size=PART_SIZE, batch_size=BATCH_SIZE), reference_url, progress=False)
    want = FeatureStore.open(reference_url)

    url = s3.url(f"many-{uuid.uuid4().hex[:8]}/store.zarr")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.format(store=url, csv=csv, model=model, part_size=PART_SIZE, batch_size=BATCH_SIZE))
    runs = start_writers(tmp_path, recipe, WRITERS)
    for run in runs:
        run.wait(timeout=300)
    assert all(run.returncode == 0 for run in runs), f"a writer failed:\n{writer_logs(tmp_path, WRITERS)}"
    summaries = [json.loads((tmp_path / f"summary-{i}.json").read_text()) for i in range(WRITERS)]

    got = FeatureStore.open(url)
    planned = {f"{split}/part-{i:06d}" for split, plan in got.plan.items() for i in range(plan["parts"])}
    assert planned == {f"{split}/{p.name}" for split in want.splits() for p in want.parts(split)}
    assert len(planned) >= 3 * WRITERS
    written = [name for summary in summaries for name in summary["written"]]
    twice = sorted({name for name in written if written.count(name) > 1})
    assert not twice, f"parts committed by two writers: {twice}"
    assert set(written) == planned, f"planned but never written: {sorted(planned - set(written))}"
    assert sum(1 for summary in summaries if summary["written"]) >= 2, "one writer did all the work"
    for summary in summaries:
        # What a writer did not write itself it found committed by another (on claiming, or while waiting).
        assert summary["parts_written"] == len(summary["written"])
        assert summary["parts_written"] + summary["parts_by_others"] + summary["parts_skipped"] == len(planned)
    assert got.active_claims() == [], "every claim is released once its part commits"

    capsys.readouterr()
    assert main(["store", "verify", url, "-q"]) == 0
    assert "OK" in capsys.readouterr().out

    assert_same_parts(got, want)


def test_a_heartbeat_racing_a_release_leaves_no_claim_behind(tmp_path):
    """The heartbeat reads a claim (still ours), then the part commits and its claim is released: the
    heartbeat's refreshed write must not put the released claim back (found with 8 writers on S3: a claim
    on a committed part was left in the store)."""
    import threading

    from zarr.storage import LocalStore

    from unipt.store._claims import Claims, Owner

    claims = Claims(LocalStore(str(tmp_path / "store")), "", Owner.current("run-a"), ttl=0.2)
    heartbeat_read, released = threading.Event(), threading.Event()
    read = claims._read

    def slow_heartbeat_read(key):
        current = read(key)
        if threading.current_thread().name == "unipt-claims" and not heartbeat_read.is_set():
            heartbeat_read.set()
            released.wait(1.0)  # the release runs here, between the heartbeat's read and its write
        return current

    claims._read = slow_heartbeat_read
    try:
        assert claims.acquire("train", "part-000000")
        assert heartbeat_read.wait(10), "the heartbeat never ran"
        claims.release("train", "part-000000")
        released.set()
    finally:
        claims.close()  # joins the heartbeat thread: its write, if any, has landed
    assert claims.holder("train", "part-000000") is None
