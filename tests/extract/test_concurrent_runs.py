"""Two extraction runs started on one store at the same moment share the work and never write a part twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_same_parts, make_text_csv, make_tiny_bert
from unipt.extract import BackboneConfig, ExtractConfig, SourceConfig, run_extraction
from unipt.store import FeatureStore, verify

PART_SIZE = 8
BATCH_SIZE = 4

# One extraction run in its own process. It imports everything, says so with its "ready" file, then waits for
# the "go" file, so both runs reach the store within a few milliseconds of each other; it prints its summary
# as JSON.
RUN = r"""
import json, os, sys, time
from unipt.extract import BackboneConfig, ExtractConfig, SourceConfig, run_extraction
from unipt.extract._runner import summary_dict
model, csv, store, go, ready = sys.argv[1:6]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
summary = run_extraction(SourceConfig(path=csv), BackboneConfig(model=model, device="cpu"),
                         ExtractConfig(part_size=%d, batch_size=%d, writer_queue=1), store, progress=False)
print(json.dumps(summary_dict(summary)))
""" % (PART_SIZE, BATCH_SIZE)


def test_two_runs_at_once_share_the_parts_and_give_the_reference_store(tmp_path):
    model = make_tiny_bert(tmp_path / "tiny-bert")
    csv = make_text_csv(tmp_path / "texts.csv", n=240)
    reference = str(tmp_path / "reference.zarr")
    run_extraction(SourceConfig(path=str(csv)), BackboneConfig(model=str(model), device="cpu"),
                   ExtractConfig(part_size=PART_SIZE, batch_size=BATCH_SIZE), reference, progress=False)

    shared, go = str(tmp_path / "shared.zarr"), tmp_path / "go"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    runs = [subprocess.Popen([sys.executable, "-c", RUN, str(model), str(csv), shared, str(go), str(flag)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for flag in ready]
    # Go once both have imported torch and transformers (slow the first time in a new environment, when
    # Python compiles every module) and are polling for the go file.
    deadline = time.monotonic() + 240
    while not all(flag.exists() for flag in ready):
        if time.monotonic() > deadline or any(run.poll() is not None for run in runs):
            for run in runs:
                run.kill()
            pytest.fail("a concurrent run did not start: " + "".join(run.communicate()[1] for run in runs))
        time.sleep(0.05)
    go.touch()
    summaries = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, f"a concurrent run failed:\n{err}"
        summaries.append(json.loads(out.strip().splitlines()[-1]))

    want = FeatureStore.open(reference)
    got = FeatureStore.open(shared)
    n_parts = sum(len(want.parts(s)) for s in want.splits())
    written = [s["parts_written"] for s in summaries]
    # Each part was written by exactly one run: the two runs' written parts add up to the store's parts.
    assert sum(written) == n_parts, f"parts written {written}, store has {n_parts}: a part was written twice"
    assert all(w > 0 for w in written), f"one run did all the work ({written}): the runs did not overlap"
    for summary, other in zip(summaries, reversed(written)):
        # What a run did not write itself, it found committed by the other (while waiting, or on claiming).
        assert summary["parts_written"] + summary["parts_by_others"] + summary["parts_skipped"] == n_parts
    assert got.active_claims() == [], "claims must be released once their parts commit"

    assert_same_parts(got, want)
    report = verify(got)
    assert report.ok, report.problems
    assert not any(Path(shared).rglob("*.partial"))


def test_a_run_that_waited_for_a_dead_run_counts_each_part_once(tmp_path, backbone, encoder):
    """Run B waits for parts run A claimed; A commits two of them, then dies. B takes the rest over and its
    summary counts the two parts once (as committed by another run), not once more when it claims them."""
    import logging
    import socket
    import threading

    import psutil

    from unipt.extract import TextEncoder
    from unipt.extract._runner import BackgroundWriter, ExtractSummary, extract_part, plan_parts
    from unipt.extract._sources import load_source
    from unipt.store._claims import Owner

    csv = make_text_csv(tmp_path / "texts.csv", n=240)
    source, url = SourceConfig(path=str(csv)), str(tmp_path / "shared.zarr")
    config = ExtractConfig(part_size=PART_SIZE, batch_size=BATCH_SIZE, claim_ttl=30.0)
    run_extraction(source, backbone, replace_splits(config, ["test"]), url, progress=False, encoder=encoder)
    store = FeatureStore.open(url, mode="r+")
    tasks = plan_parts("train", load_source(source).splits["train"], PART_SIZE)

    # Run A: a live process holding a claim on every train part.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    owner = Owner("run-a", socket.gethostname(), holder.pid, psutil.Process(holder.pid).create_time())
    claims = Path(url) / "_claims" / "train"
    claims.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        (claims / f"{task.name}.json").write_text(json.dumps(
            {"owner": owner.__dict__, "token": "a", "claimed": time.time(), "heartbeat": time.time(), "ttl": 30.0}))

    result: dict = {}
    waiting = threading.Event()

    class Waiting(logging.Handler):
        def emit(self, record):
            if "waiting for" in record.getMessage():
                waiting.set()

    handler, runner_log = Waiting(), logging.getLogger("unipt.extract._runner")
    level = runner_log.level
    runner_log.addHandler(handler)
    runner_log.setLevel(logging.INFO)
    runner = threading.Thread(target=lambda: result.setdefault(
        "summary", run_extraction(source, backbone, config, url, progress=False, encoder=encoder)))
    try:
        runner.start()
        assert waiting.wait(120), "run B never waited for run A's parts"
        # Run A commits its first two parts, releases their claims, and dies holding the others.
        mine, writer = TextEncoder(backbone), BackgroundWriter(2)
        for task in tasks[:2]:
            extract_part(mine, store, task, BATCH_SIZE, writer, ExtractSummary(store=url))
        writer.close()
        for task in tasks[:2]:
            (claims / f"{task.name}.json").unlink()
        holder.kill()
        holder.wait()
        runner.join(120)
    finally:
        runner_log.removeHandler(handler)
        runner_log.setLevel(level)
        holder.kill()
    summary = result["summary"]
    total = sum(len(FeatureStore.open(url).parts(s)) for s in ("train", "validation", "test"))
    assert summary.parts_by_others == 2, summary.describe()
    assert summary.parts_written == len(tasks) - 2 + len(FeatureStore.open(url).parts("validation"))
    assert summary.parts_written + summary.parts_by_others + summary.parts_skipped == total
    assert verify(FeatureStore.open(url)).ok


def replace_splits(config: ExtractConfig, splits: list[str]) -> ExtractConfig:
    from dataclasses import replace

    return replace(config, splits=splits)
