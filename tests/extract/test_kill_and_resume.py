"""Extraction survives SIGKILL at any moment.

The `unipt extract` command is run on a tiny random BERT and killed with SIGKILL (no cleanup code, no
exception handler, no flush runs) at a moment drawn by a seeded RNG over the whole run, or right after its
first part folder appears or its first commit marker lands. Between the kill and the re-run, readers must
see only committed, fully readable parts. Re-running the same command must then complete the store so that
it is byte-identical to an uninterrupted extraction, without rewriting (or touching) any part committed
before the kill.

Most kills go to `unipt.pipelines.cli.main` running in a process forked from a "zygote" that has already
imported everything `unipt extract` imports: the same code path as `python -m unipt.pipelines extract ...`
minus ~4 s of interpreter start-up and imports, where nothing is written. That keeps ~20 trials within about
a minute on 2 cores and puts the kill moments where the writes are. A few trials kill the real command line,
anywhere from start-up to the end.

A second group of tests rebuilds, deterministically, the exact on-disk state a kill leaves inside each window
of the store's own metadata writes (creating the store, a split, a part, a commit marker), where a random
kill almost never lands, and checks that a re-run repairs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import make_text_csv, make_tiny_bert
from unipt.pipelines.cli import main
from unipt.store import FeatureStore, PartData, StoreError, verify

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32",
                                reason="needs fork() and SIGKILL (POSIX)")

RECIPE = "tweets-minilm"
N_ROWS = 300  # ~240 train / 30 validation / 30 test examples
PART_SIZE = 16  # ~20 parts: many commit points
BATCH_SIZE = 4
SEED = 1729
N_CLI = 4  # kills of the real command line, stratified uniform over [0.2 s, its reference duration]
N_FORKED = 14  # kills of forked runs, stratified uniform over [0.02 s, the forked reference duration]
AFTER_PART_STARTED_MS = (0,)  # kills as soon as the first part folder appears (a half-written part)
AFTER_FIRST_COMMIT_MS = (0, 10, 40)  # kills right after the first commit marker lands
COMMIT_ATTR = "unipt_commit"  # the store's commit marker (unipt.store._format.COMMIT_ATTR)

KILL_TRIALS = ([f"cli-random-{i:02d}" for i in range(N_CLI)]
               + [f"random-{i:02d}" for i in range(N_FORKED)]
               + [f"part-started+{ms}ms" for ms in AFTER_PART_STARTED_MS]
               + [f"first-commit+{ms}ms" for ms in AFTER_FIRST_COMMIT_MS])


# --------------------------------------------------------------------------- the forked runner
ZYGOTE = r"""
import json, os, select, signal, sys, traceback
from unipt.pipelines.cli import main
import unipt.pipelines._stages  # everything `unipt extract` imports lazily, loaded once before any fork

buffer = b""

def read_line(timeout=None):
    global buffer
    while b"\n" not in buffer:
        if not select.select([0], [], [], timeout)[0]:
            return None
        chunk = os.read(0, 1 << 16)
        if not chunk:
            raise EOFError
        buffer += chunk
    line, buffer = buffer.split(b"\n", 1)
    return line.decode()

def child(request):
    code = 1
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        code = main(request["argv"])
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

def reply(message):
    os.write(1, (json.dumps(message) + "\n").encode())

reply("ready")
while True:
    try:
        line = read_line()
    except EOFError:
        break
    if not line.startswith("{"):
        continue  # a "kill" that crossed the run's exit: nothing to kill
    pid = os.fork()
    if pid == 0:
        child(json.loads(line))
    reply({"pid": pid})
    while True:  # the child stays ours (un-reaped) until waitpid returns it: a kill cannot hit another process
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        try:
            command = read_line(0.001)
        except EOFError:
            command = "kill"
        if command == "kill":
            os.kill(pid, signal.SIGKILL)
    reply({"exit": os.waitstatus_to_exitcode(status)})
"""


class Zygote:
    """A process that has imported unipt once and forks one child per extraction; it SIGKILLs its own child
    on request (so the kill can never reach a recycled pid)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=child_env())
        self._buffer = b""
        self._ready = False

    def _wait_ready(self) -> None:
        if not self._ready:
            assert self._line(120) == '"ready"', f"the zygote did not start (exit {self.proc.poll()})"
            self._ready = True

    def _line(self, timeout: float | None) -> str | None:
        fd = self.proc.stdout.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            assert chunk, f"the zygote died (exit {self.proc.poll()})"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def _send(self, line: str) -> None:
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def start(self, argv: list[str], log: Path) -> None:
        self._wait_ready()
        self._send(json.dumps({"argv": argv, "log": str(log)}))
        assert "pid" in json.loads(self._line(60))

    def wait(self, timeout: float | None) -> int | None:
        """The run's exit code (negative: killed by that signal), or None if it is still running."""
        line = self._line(timeout)
        return None if line is None else json.loads(line)["exit"]

    def kill(self) -> int:
        self._send("kill")
        code = self.wait(60)
        assert code is not None, "the killed run did not exit"
        return code

    def close(self) -> None:
        self.proc.stdin.close()  # the zygote's loop ends at end of input
        self.proc.wait(timeout=60)
        self.proc.stdout.close()


# --------------------------------------------------------------------------- helpers
@dataclass
class Env:
    model: Path
    csv: Path
    duration: float = 0.0  # wall seconds of the uninterrupted command-line run (start-up included)
    forked_duration: float = 0.0  # the same run forked from the zygote
    reference: dict[tuple[str, str], tuple[PartData, dict[str, str]]] | None = None  # -> data, commit sha256 map
    reference_url: str = ""
    zygote: Zygote | None = None

    def overrides(self, workdir: Path) -> list[str]:
        return [f"backbone.model='{self.model}'", "backbone.device=cpu", f"source.path='{self.csv}'",
                "source.text_column=text", "source.label_column=label", "source.encoding=utf-8",
                "source.max_examples={}", f"workdir='{workdir}'", f"extract.part_size={PART_SIZE}",
                f"extract.batch_size={BATCH_SIZE}", "extract.writer_queue=1"]

    def argv(self, workdir: Path) -> list[str]:
        return ["extract", RECIPE, "-q", *self.overrides(workdir)]

    def command(self, workdir: Path) -> list[str]:
        return [sys.executable, "-m", "unipt.pipelines", *self.argv(workdir)]


def child_env() -> dict[str, str]:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def store_dir(workdir: Path) -> Path:
    return workdir / "features.zarr"  # the recipe's default store: <workdir>/features.zarr


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def commit_record(part_dir: Path) -> dict | None:
    """The part's commit marker as stored, or None (no metadata yet, or not committed)."""
    try:
        attrs = json.loads((part_dir / "zarr.json").read_bytes()).get("attributes", {})
    except (FileNotFoundError, ValueError):
        return None
    return attrs.get(COMMIT_ATTR)


def committed_on_disk(root: Path) -> dict[tuple[str, str], dict[str, tuple[int, str]]]:
    """Every committed part, straight from the files: relative path -> (mtime_ns, sha256) of each file."""
    out = {}
    for meta in sorted(root.glob("*/part-*/zarr.json")):
        part = meta.parent
        if commit_record(part) is not None:
            out[(part.parent.name, part.name)] = {
                str(p.relative_to(part)): (p.stat().st_mtime_ns, sha256(p.read_bytes()))
                for p in sorted(part.rglob("*")) if p.is_file()}
    return out


def read_all(url: str) -> dict[tuple[str, str], tuple[PartData, dict[str, str]]]:
    store = FeatureStore.open(url)
    out = {}
    for split in store.splits():
        for info in store.parts(split):
            record = commit_record(Path(url) / split / info.name)
            out[(split, info.name)] = (store.read_part(info), record["sha256"])
    return out


def assert_same_part(got: PartData, want: PartData, where: str) -> None:
    assert got.info == want.info, f"{where}: {got.info} != {want.info}"
    for column in ("example_id", "label", "length", "offsets"):
        assert np.array_equal(getattr(got, column), getattr(want, column)), f"{where}: {column} differs"
    assert sorted(got.layers) == sorted(want.layers), f"{where}: layers {sorted(got.layers)}"
    for layer, values in want.layers.items():
        assert got.layers[layer].dtype == values.dtype and torch.equal(got.layers[layer], values), \
            f"{where}: layer {layer} differs"


def assert_equals_reference(env: Env, url: str) -> None:
    """Same committed parts, same decoded columns and layers, same stored bytes (commit sha256 maps)."""
    got = read_all(url)
    assert sorted(got) == sorted(env.reference), f"committed parts differ from the reference in {url}"
    for key, (want_data, want_sha) in env.reference.items():
        data, sha = got[key]
        assert_same_part(data, want_data, "/".join(key))
        assert sha == want_sha, f"{'/'.join(key)}: stored objects differ from the reference"
    assert FeatureStore.open(url).provenance == FeatureStore.open(env.reference_url).provenance
    report = verify(FeatureStore.open(url))
    assert report.ok, "verify found problems:\n" + "\n".join(map(str, report.problems))
    assert report.parts == len(env.reference)


def resume(env: Env, workdir: Path) -> None:
    """Run the same extraction command again, to completion (in this process: a fresh interpreter's start-up
    is exercised by the runs that get killed). Its error message, if any, is in the captured stderr."""
    code = main(env.argv(workdir))
    assert code == 0, f"re-running the extraction failed (exit {code}); see the captured stderr"


# --------------------------------------------------------------------------- the reference runs
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-and-resume")
    env = Env(make_tiny_bert(root / "tiny-bert"), make_text_csv(root / "texts.csv", n=N_ROWS))
    env.zygote = Zygote()  # imports while the reference command runs
    try:
        workdir = root / "reference"
        started = time.monotonic()
        done = subprocess.run(env.command(workdir), env=child_env(), capture_output=True, text=True, timeout=300)
        env.duration = time.monotonic() - started
        assert done.returncode == 0, f"the reference extraction failed:\n{done.stderr}"
        env.reference_url = str(store_dir(workdir))
        env.reference = read_all(env.reference_url)
        assert len(env.reference) >= 15, f"only {len(env.reference)} parts: too few commit points"
        assert sum(d.info.n_examples for d, _ in env.reference.values()) == N_ROWS

        # The forked runner writes the very same store, and gives the time scale of the forked trials.
        workdir = root / "forked-reference"
        env.zygote.start(env.argv(workdir), root / "forked-reference.log")
        started = time.monotonic()
        code = env.zygote.wait(300)
        env.forked_duration = time.monotonic() - started
        assert code == 0, (root / "forked-reference.log").read_text()
        assert_equals_reference(env, str(store_dir(workdir)))
        print(f"\nreference: {len(env.reference)} parts; command line {env.duration:.2f} s, "
              f"forked {env.forked_duration:.2f} s")
        yield env
    finally:
        env.zygote.close()


# --------------------------------------------------------------------------- kill trials
def kill_delay(trial: str, low: float, high: float, n: int) -> float:
    """Stratified uniform draw over [low, high]: trial i of n lands in the i-th of n equal slices."""
    index = int(trial.rsplit("-", 1)[1])
    u = random.Random(f"{SEED}-{trial}").random()
    return low + (index + u) * (max(high, low + 0.1) - low) / n


def first_part_started(root: Path) -> bool:
    return any(root.glob("*/part-*"))


def first_part_committed(root: Path) -> bool:
    return any(commit_record(meta.parent) is not None for meta in root.glob("*/part-*/zarr.json"))


def run_and_kill(env: Env, trial: str, workdir: Path, log: Path) -> tuple[float, int]:
    """Start the extraction, SIGKILL it at the trial's moment; returns (seconds it ran, exit code)."""
    if trial.startswith("cli-"):
        with log.open("wb") as stderr:
            proc = subprocess.Popen(env.command(workdir), env=child_env(), stdout=subprocess.DEVNULL, stderr=stderr)
        started = time.monotonic()
        try:
            proc.wait(timeout=kill_delay(trial, 0.2, env.duration, N_CLI))
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)  # our own child, not yet reaped
        finally:
            proc.wait()
        return time.monotonic() - started, proc.returncode

    zygote, root = env.zygote, store_dir(workdir)
    zygote.start(env.argv(workdir), log)
    started = time.monotonic()
    if trial.startswith("random-"):
        code = zygote.wait(kill_delay(trial, 0.02, env.forked_duration, N_FORKED))
    else:
        kind, extra = trial.split("+")
        event = first_part_started if kind == "part-started" else first_part_committed
        while (code := zygote.wait(0.001)) is None and not event(root):
            assert time.monotonic() - started < 120, f"{kind}: nothing happened in 120 s"
        assert code is None, f"the run ended (exit {code}) before the event {kind}"
        code = zygote.wait(int(extra[:-2]) / 1000)
    if code is None:
        code = zygote.kill()
    return time.monotonic() - started, code


# A kill can leave a `zarr.<uuid>.partial` temp file in the store root; readers list splits without zarr's
# member scan, so it is harmless (test_a_temp_file_left_by_a_kill_does_not_haunt_readers).
@pytest.mark.parametrize("trial", KILL_TRIALS)
def test_sigkill_then_rerun_gives_the_reference_store(env, trial, tmp_path):
    workdir, log = tmp_path / "work", tmp_path / "killed.log"
    root = store_dir(workdir)
    ran, code = run_and_kill(env, trial, workdir, log)
    if code != -signal.SIGKILL:  # it finished first: a valid (if dull) trial
        assert code == 0, log.read_text()

    # Between the kill and the re-run: readers see exactly the parts committed on disk, each reads back in
    # full and equals the reference.
    before = committed_on_disk(root) if root.exists() else {}
    if (root / "zarr.json").exists():
        store = FeatureStore.open(str(root))
        visible = {(split, info.name): info for split in store.splits() for info in store.parts(split)}
        assert sorted(visible) == sorted(before)
        for key, info in visible.items():
            assert_same_part(store.read_part(info), env.reference[key][0], "/".join(key))
            assert commit_record(root / key[0] / key[1])["sha256"] == env.reference[key][1]
        # verify finds no damage, and says the store is unfinished exactly when parts are missing.
        report = verify(store)
        damage = [p for p in report.problems if p.kind not in ("incomplete", "uncommitted")]
        assert not damage, "verify found damage after the kill:\n" + "\n".join(map(str, damage))
        assert any(p.kind == "incomplete" for p in report.problems) == (len(before) < len(env.reference))
    else:
        assert before == {}, "parts committed into a store that has no root metadata"
    if trial.startswith("first-commit"):
        assert before, "the first commit was seen, but no committed part is on disk"
    print(f"{trial}: exit {code} after {ran:.3f} s; {len(before)}/{len(env.reference)} parts committed; "
          f"{sum(1 for _ in root.glob('*/part-*'))} part folders")

    resume(env, workdir)

    assert_equals_reference(env, str(root))
    # Parts committed before the kill were left alone: same files, same bytes, same modification times.
    after = committed_on_disk(root)
    for key, files in before.items():
        assert after[key] == files, f"{'/'.join(key)} was committed before the kill but rewritten by the re-run"


# --------------------------------------------------------------------------- crash windows, rebuilt
def partial_name(key: str) -> str:
    """The temporary file zarr's LocalStore writes ``key`` through (``<stem>.<uuid hex>.partial``, renamed
    over ``key`` once complete); SIGKILL before the rename leaves it behind."""
    return str(Path(key).with_suffix(f".{uuid.uuid4().hex}.partial"))


def copy_reference_root(env: Env, root: Path) -> None:
    root.mkdir(parents=True)
    shutil.copy(Path(env.reference_url) / "zarr.json", root / "zarr.json")


def first_part(env: Env) -> tuple[str, str]:
    return min(env.reference, key=lambda key: (key[0] != "train", key))


def state_empty_store_folder(env: Env, root: Path) -> None:
    """Killed after the store's folder was made, before its metadata was written."""
    root.mkdir(parents=True)


def state_root_metadata_cut(env: Env, root: Path) -> None:
    """Killed while the store's root zarr.json (group + unipt attributes, one write) was being written."""
    root.mkdir(parents=True)
    data = (Path(env.reference_url) / "zarr.json").read_bytes()
    (root / partial_name("zarr.json")).write_bytes(data[: len(data) // 2])


def state_root_without_attributes(env: Env, root: Path) -> None:
    """A group without unipt attributes: what a kill between the group's creation and its attributes write
    left when store creation took two writes (unipt before 22b587a); a re-run must still repair it."""
    zarr.open_group(store=str(root), mode="w-", zarr_format=3)


def state_split_metadata_cut(env: Env, root: Path) -> None:
    """Killed while a split's zarr.json was being written (create_group)."""
    copy_reference_root(env, root)
    split = root / first_part(env)[0]
    split.mkdir()
    (split / partial_name("zarr.json")).write_bytes(b'{"zarr_format": 3, "node_ty')


def state_part_half_written(env: Env, root: Path) -> None:
    """Killed in the middle of a part: its metadata and some arrays written, columns and commit not."""
    copy_reference_root(env, root)
    split, name = first_part(env)
    source, target = Path(env.reference_url) / split, root / split
    target.mkdir()
    shutil.copy(source / "zarr.json", target / "zarr.json")
    columns = ("offsets", "example_id", "label", "length")  # written after the layers: not yet there
    shutil.copytree(source / name, target / name, ignore=lambda folder, names: [n for n in names if n in columns])
    meta = json.loads((target / name / "zarr.json").read_bytes())
    del meta["attributes"][COMMIT_ATTR]
    (target / name / "zarr.json").write_text(json.dumps(meta))
    layer = sorted(p for p in (target / name).iterdir() if p.name.startswith("layer_"))[-1]
    for chunk in (layer / "c").rglob("*"):
        if chunk.is_file():  # the last layer's shard was being written
            chunk.rename(chunk.parent / partial_name(chunk.name))  # nothing at the final name yet


def state_commit_write_cut(env: Env, root: Path) -> None:
    """Killed while the commit marker was being written: every array complete, the marker in a temp file."""
    copy_reference_root(env, root)
    split, name = first_part(env)
    source, target = Path(env.reference_url) / split, root / split
    target.mkdir()
    shutil.copy(source / "zarr.json", target / "zarr.json")
    shutil.copytree(source / name, target / name)
    committed = (target / name / "zarr.json").read_bytes()
    meta = json.loads(committed)
    del meta["attributes"][COMMIT_ATTR]
    (target / name / "zarr.json").write_text(json.dumps(meta))
    (target / name / partial_name("zarr.json")).write_bytes(committed[: len(committed) - 7])


CRASH_STATES = [
    pytest.param(state_empty_store_folder, id="empty-store-folder"),
    pytest.param(state_root_metadata_cut, id="root-metadata-write-cut"),
    pytest.param(state_root_without_attributes, id="root-group-without-unipt-attributes"),
    pytest.param(state_split_metadata_cut, id="split-metadata-write-cut",  # zarr warns about the bare folder
                 marks=pytest.mark.filterwarnings("ignore:Object at .* is not recognized")),
    pytest.param(state_part_half_written, id="part-half-written"),
    pytest.param(state_commit_write_cut, id="commit-marker-write-cut"),
]


@pytest.mark.parametrize("make_state", CRASH_STATES)
def test_rerun_repairs_the_state_a_kill_leaves_in_each_metadata_window(env, make_state, tmp_path):
    workdir = tmp_path / "work"
    root = store_dir(workdir)
    make_state(env, root)
    if (root / "zarr.json").exists():  # readers see no half-written part
        try:
            store = FeatureStore.open(str(root))
        except StoreError:  # not (yet) a unipt store: nothing for a reader to see
            store = None
        if store is not None:
            for split in store.splits():
                for info in store.parts(split):
                    store.read_part(info)
    resume(env, workdir)
    assert_equals_reference(env, str(root))


def test_a_temp_file_left_by_a_kill_does_not_haunt_readers(env, tmp_path):
    workdir = tmp_path / "work"
    root = store_dir(workdir)
    copy_reference_root(env, root)
    # The kill hit the creation of a part (or of one of its arrays): zarr "ensures" every parent group, writing
    # a bare group document for the root to a temp file that it then links, exclusively, onto zarr.json
    # (which exists, so the link fails and the temp file is unlinked; SIGKILL comes before that).
    bare_group = {"zarr_format": 3, "node_type": "group", "attributes": {}, "consolidated_metadata": None}
    (root / partial_name("zarr.json")).write_text(json.dumps(bare_group, indent=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resume(env, workdir)
        assert_equals_reference(env, str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what a reader of the finished store sees
        store = FeatureStore.open(str(root))
        assert store.splits() == FeatureStore.open(env.reference_url).splits()
