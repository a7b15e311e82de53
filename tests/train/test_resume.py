"""Resumable sweeps: finished runs are skipped, unfinished runs go on from their last saved epoch, and a sweep
killed with SIGKILL at random moments ends, once re-run, with the checkpoints and numbers of an uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_store_recipe, write_tiny_store
from test_sweep import assert_same_run, mixed_runs, without_timing
from unipt.train import LoaderConfig, MetricsLog, TrainConfig, fit_many
from unipt.train import _trainer

MEMORY = LoaderConfig(mode="memory", background="off")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_tiny_store(str(tmp_path_factory.mktemp("resume") / "store.zarr"))


class Interrupted(Exception):
    pass


def interrupt_at(name: str, epoch: int):
    """An on_epoch hook that stops the whole sweep when run ``name`` finishes ``epoch``: the kill lands after
    every earlier run of that epoch saved its state and before ``name`` saved its own."""
    def hook(run, finished_epoch, metrics):
        if (run, finished_epoch) == (name, epoch):
            raise Interrupted
        return False
    return hook


def test_an_interrupted_sweep_resumes_to_the_uninterrupted_result(store, tmp_path):
    runs = mixed_runs()
    reference = fit_many(runs, store, tmp_path / "reference", loader_config=MEMORY, progress=False)
    # Killed during epoch 2's saves: the runs before unipt-r4 saved epoch 2, unipt-r4 and those after did not.
    with pytest.raises(Interrupted):
        fit_many(runs, store, tmp_path / "resumed", loader_config=MEMORY, progress=False,
                 on_epoch=interrupt_at("unipt-r4", 2))
    saved = {name: json.loads((tmp_path / "resumed" / name / "train-state.json").read_text())["epochs_done"]
             for name in runs}
    assert saved == {"unipt-r2": 2, "unipt-r4": 1, "lst": 1, "probe": 1, "mix": 1}
    log = tmp_path / "resumed.jsonl"
    resumed = fit_many(runs, store, tmp_path / "resumed", loader_config=MEMORY, progress=False, log=MetricsLog(log))
    for a, b in zip(reference, resumed):
        assert_same_run(a, b)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["run"]: r["resumed_after_epoch"] for r in records if "resumed_after_epoch" in r} == saved
    # Only the epochs after each run's save were trained again.
    trained = sorted((r["run"], r["epoch"]) for r in records if "train_loss" in r)
    assert trained == sorted([("unipt-r2", 3), ("unipt-r4", 2), ("lst", 2), ("probe", 2)])  # probe: max_steps in epoch 2


def test_finished_runs_are_read_back_not_trained(store, tmp_path, monkeypatch):
    runs = {"a": TrainConfig(method="linear_probe", epochs=2, batch_size=8, device="cpu"),
            "b": TrainConfig(method="unipt", epochs=1, batch_size=8, device="cpu", lr=1e-3)}
    first = fit_many(runs, store, tmp_path, loader_config=MEMORY, progress=False)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(_trainer, "_train_pass", no_training)
    again = fit_many(runs, store, tmp_path, loader_config=MEMORY, progress=False)
    for a, b in zip(first, again):
        assert a.__dict__ == b.__dict__
    # stack and device may change between sessions; a result stays valid
    moved = {name: TrainConfig(**{**c.__dict__, "stack": "off"}) for name, c in runs.items()}
    assert [r.test_metrics for r in fit_many(moved, store, tmp_path, loader_config=MEMORY, progress=False)] == \
        [r.test_metrics for r in first]


def test_a_changed_run_is_refused_and_restart_trains_it_again(store, tmp_path):
    runs = {"a": TrainConfig(method="linear_probe", epochs=2, batch_size=8, device="cpu")}
    fit_many(runs, store, tmp_path, loader_config=MEMORY, progress=False)
    changed = {"a": TrainConfig(method="linear_probe", epochs=2, batch_size=8, device="cpu", lr=1e-2)}
    with pytest.raises(ValueError, match=r"trained with lr = 0.0005, but the run now has lr = 0.01.*--restart"):
        fit_many(changed, store, tmp_path, loader_config=MEMORY, progress=False)
    (result,) = fit_many(changed, store, tmp_path, loader_config=MEMORY, progress=False, resume=False)
    assert result.config["lr"] == 1e-2
    from unipt.train._resume import check_same_run

    with pytest.raises(ValueError, match="trained from another store"):
        check_same_run("folder", "a", {"train": result.config, "store": {"label_names": ["a", "b", "c"]}},
                       result.config, {"label_names": ["x", "y", "z"]})


def test_a_damaged_state_record_is_named(store, tmp_path):
    runs = {"a": TrainConfig(method="linear_probe", epochs=2, batch_size=8, device="cpu")}
    with pytest.raises(Interrupted):
        fit_many(runs, store, tmp_path, loader_config=MEMORY, progress=False, on_epoch=interrupt_at("a", 2))
    (tmp_path / "a" / "train-state.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"train-state.json is not JSON"):
        fit_many(runs, store, tmp_path, loader_config=MEMORY, progress=False)


# --------------------------------------------------------------------------- SIGKILL at random moments
SWEEP = """
[train.unipt]
method = "unipt"
epochs = 4
batch_size = 8
lr = 3e-3
data_seed = 0
stack = "{stack}"
sweep = {{ lr = [1e-3, 3e-3], seed = [0, 1] }}

[train.probe]
method = "linear_probe"
epochs = 3
batch_size = 8
data_seed = 0
stack = "{stack}"
"""


def _train_command(recipe: Path) -> list[str]:
    return [sys.executable, "-m", "unipt.pipelines", "train", str(recipe), "-q"]


def _results(workdir: Path) -> dict[str, dict]:
    runs = json.loads((workdir / "summary.json").read_text())["runs"]
    timing = ("train_seconds", "train_examples_per_s", "checkpoint", "runs_in_pass", "stacked")
    return {r["name"]: {**{k: v for k, v in r.items() if k not in timing}, "history": without_timing(r["history"])}
            for r in runs}


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
@pytest.mark.parametrize("stack", ["off", "on"])
def test_a_sweep_killed_at_random_moments_resumes_to_the_same_checkpoints(stack, tmp_path):
    store_url = str(tmp_path / "store.zarr")
    write_tiny_store(store_url, sizes=(("train", 240), ("validation", 30), ("test", 30)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    reference = write_store_recipe(tmp_path / "reference.toml", store_url, tmp_path / "reference", SWEEP.format(stack=stack))
    subprocess.run(_train_command(reference), check=True, env=env, capture_output=True, timeout=300)

    recipe = write_store_recipe(tmp_path / "killed.toml", store_url, tmp_path / "killed", SWEEP.format(stack=stack))
    log = tmp_path / "killed" / "metrics.jsonl"
    rng = random.Random(7 if stack == "off" else 8)
    kills = 0
    for trial in range(5):
        lines = len(log.read_text().splitlines()) if log.exists() else 0
        process = subprocess.Popen(_train_command(recipe), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Wait for the session's first new log line (training under way), then kill a random moment later:
        # inside a pass, during an evaluation, between two runs' saves, or during a save.
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if log.exists() and len(log.read_text().splitlines()) > lines:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        if process.poll() is not None:
            break  # it finished before the kill
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
    assert kills >= 2, "the sweep finished too soon to be killed"
    finished = subprocess.run(_train_command(recipe), env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr

    expected, got = _results(tmp_path / "reference"), _results(tmp_path / "killed")
    assert sorted(got) == sorted(expected)
    for name in expected:
        if stack == "off":
            assert got[name] == expected[name], name
        else:  # stacked steps are batched: equal to float tolerance, as stacked vs separate
            assert got[name]["best_epoch"] == expected[name]["best_epoch"], name
            for split in ("eval_metrics", "test_metrics"):
                for metric, value in expected[name][split].items():
                    assert got[name][split][metric] == pytest.approx(value, abs=1e-4), (name, split, metric)
        a = load_file(str(tmp_path / "reference" / "checkpoints" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "killed" / "checkpoints" / name / "model.safetensors"))
        for key in a:
            if stack == "on" and key == "side.gate.bias":
                # Its true gradient is 0 (the softmax over layers ignores a shared offset): AdamW turns rounding
                # noise into steps of about lr, so batched and unbatched steps drift apart (as in test_stacked).
                continue
            torch.testing.assert_close(b[key], a[key], rtol=0 if stack == "off" else 1e-4,
                                       atol=0 if stack == "off" else 1e-5, msg=f"{name} {key}")
        leftovers = [p.name for p in (tmp_path / "killed" / "checkpoints" / name).iterdir() if p.name.startswith(".tmp-")]
        assert not leftovers  # the temp files of writes a kill cut short are cleared on resume


# --------------------------------------------------------------------------- a run folder on object storage
def test_a_run_folder_on_s3_resumes_and_reads_back(store, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))  # tests/store: the S3 endpoint helper
    from s3_server import moto_s3
    from unipt.train import load_checkpoint

    runs = {"a": TrainConfig(method="linear_probe", epochs=3, batch_size=8, device="cpu", stack="off"),
            "b": TrainConfig(method="unipt", epochs=3, batch_size=8, device="cpu", lr=1e-3, stack="off")}
    reference = fit_many(runs, store, tmp_path / "local", loader_config=MEMORY, progress=False)
    with pytest.MonkeyPatch.context() as monkeypatch, moto_s3(monkeypatch, tmp_path / "aws") as s3:
        folder = s3.url("sweeps/checkpoints")
        with pytest.raises(Interrupted):
            fit_many(runs, store, folder, loader_config=MEMORY, progress=False, on_epoch=interrupt_at("b", 2))
        names = sorted(p.rsplit("/", 1)[-1] for p in s3.filesystem().ls(f"{s3.bucket}/sweeps/checkpoints/b"))
        assert names == ["config.json", "model.safetensors", "train-state-e0001.safetensors", "train-state.json"]
        resumed = fit_many(runs, store, folder, loader_config=MEMORY, progress=False)
        for a, b in zip(reference, resumed):
            assert (a.best_epoch, a.eval_metrics, a.test_metrics) == (b.best_epoch, b.eval_metrics, b.test_metrics)
            assert without_timing(a.history) == without_timing(b.history)
            assert b.checkpoint == f"{folder}/{b.name}"
            remote, _ = load_checkpoint(b.checkpoint)
            local = load_file(f"{a.checkpoint}/model.safetensors")
            for key, value in remote.state_dict().items():
                assert torch.equal(value, local[key]), key
        again = fit_many(runs, store, folder, loader_config=MEMORY, progress=False)
        assert [r.__dict__ for r in again] == [r.__dict__ for r in resumed]
