"""Recipes and the `unipt` command: every shipped recipe loads and runs end to end on a tiny model."""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import WORDS
from unipt.extract import ImageSourceConfig
from unipt.pipelines import (apply_override, build_recipe, load_recipe, results_table, shipped_recipes, train_stage,
                             write_report)
from unipt.pipelines._recipe import select_runs
from unipt.pipelines._recipe import recipe_has_towers
from unipt.pipelines.cli import main
from unipt.store import FeatureStore


def tiny_overrides(model_dir: Path, csv_path: Path, workdir: Path, runs) -> list[str]:
    """Point a recipe at the tiny BERT and the synthetic CSV, and cut training to a few steps."""
    items = [f"backbone.model='{model_dir}'", f"source.path='{csv_path}'", "source.text_column=text",
             "source.label_column=label", "source.encoding=utf-8", "source.max_examples={}",
             f"workdir='{workdir}'", "extract.part_size=32", "extract.batch_size=8"]
    for run in runs:
        items += [f"train.{run}.epochs=1", f"train.{run}.max_steps=3"]
    return items


def tiny_image_overrides(model_dir: Path, folder: Path, workdir: Path, runs, image_size: int) -> list[str]:
    """Point an image recipe at a tiny vision model and the generated image folder."""
    items = [f"backbone.model='{model_dir}'", f"backbone.image_size={image_size}", f"source.path='{folder}'",
             "source.max_examples={}", f"workdir='{workdir}'", "extract.part_size=16", "extract.batch_size=8"]
    for run in runs:
        items += [f"train.{run}.epochs=1", f"train.{run}.max_steps=3"]
    return items


def test_a_recipe_ships():
    assert "tweets-minilm" in shipped_recipes()


def task_source_overrides(recipe, folder: Path, image_folder: Path) -> tuple[list[str], int]:
    """Synthetic rows in a task recipe's own columns (its targets' kind, its pair and group columns), and the
    overrides that point the recipe at them: (overrides, number of examples)."""
    source = recipe.source
    rng = random.Random(0)
    if isinstance(source, ImageSourceConfig):  # a multilabel image table: each image gets a set of tags
        table = folder / "tags.csv"
        images = sorted(image_folder.rglob("*.png"))
        with open(table, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow([source.image_column, source.label_column])
            for k, image in enumerate(images):
                tags = sorted({image.parent.name, *rng.sample(["red", "round", "small"], k % 3)})
                # relative to the table, as a table would hold them: the ids (and so the splits) do not
                # depend on where the test's temporary folders are
                out.writerow([os.path.relpath(image, table.parent), source.label_delimiter.join(tags)])
        return [f"source.path='{table}'"], len(images)
    rows = []
    for k in range(120):
        words = [rng.choice(WORDS) for _ in range(rng.randint(0, 9))] + [f"w{k}"]  # distinct: none deduped
        row = {source.text_column: words if source.task == "tagging" else " ".join(words)}
        if source.text_pair_column:
            row[source.text_pair_column] = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
        if source.id_column:
            row[source.id_column] = f"row{k}"
        if source.group_column:
            row[source.group_column] = f"group{k % 40}"
        row[source.label_column] = {"tagging": [w[0] for w in words], "regression": rng.uniform(-4, 4),
                                    "multilabel": sorted(set(w[0] for w in words))}.get(source.task, rng.choice("ab"))
        rows.append(row)
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f"source.path='{path}'"], len(rows)


@pytest.mark.parametrize("name", sorted(name for name, path in shipped_recipes().items()
                                         if not recipe_has_towers(str(path))))  # retrieval: test_retrieval_recipes
def test_every_shipped_recipe_runs_a_few_steps(name, tiny_bert_dir, tiny_vit_dir, tiny_resnet_dir, image_folder,
                                               text_csv, tmp_path, capsys):
    recipe = load_recipe(name)
    runs = list(recipe.train)
    typed = recipe.source.task != "classification" or getattr(recipe.source, "text_pair_column", None)
    if isinstance(recipe.source, ImageSourceConfig):  # a CNN recipe trains unipt_cnn: the tiny ResNet's maps
        cnn = any(config.method == "unipt_cnn" for config in recipe.train.values())
        model, size = (tiny_resnet_dir, 64) if cnn else (tiny_vit_dir, 32)
        overrides = tiny_image_overrides(model, image_folder, tmp_path / "work", runs, size)
        n_examples = 36
    else:
        overrides = tiny_overrides(tiny_bert_dir, text_csv, tmp_path / "work", runs)
        n_examples = 120
    if typed:  # a task recipe (multilabel, regression, tagging, pairs): data in its own columns
        keep = ("source.text_column", "source.label_column", "source.encoding", "source.path")
        overrides = [o for o in overrides if not o.startswith(keep)]
        more, n_examples = task_source_overrides(recipe, tmp_path, image_folder)
        overrides += more + ["source.max_examples={}"]
    code = main(["run", name, "-q", *overrides])
    assert code == 0
    out = capsys.readouterr().out
    for run in runs:
        assert f"| {run} " in out  # one table row per run
        checkpoint = tmp_path / "work" / "checkpoints" / run
        assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "config.json").is_file()
    store = FeatureStore.open(str(tmp_path / "work" / "features.zarr"))
    assert store.num_examples("train") + store.num_examples("validation") + store.num_examples("test") == n_examples
    summary = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == runs
    scored = store.num_examples("test")  # tagging scores words: at least one per example
    assert all(r["test_metrics"]["n"] == scored if store.task != "tagging" else r["test_metrics"]["n"] >= scored
               for r in summary["runs"])
    epochs = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert {e["run"] for e in epochs} == set(runs)


def test_stages_separately_then_eval_and_resume(tiny_bert_dir, text_csv, tmp_path, capsys):
    args = tiny_overrides(tiny_bert_dir, text_csv, tmp_path, ["unipt", "linear_probe"])
    assert main(["extract", "tweets-minilm", "-q", *args]) == 0
    store_url = str(tmp_path / "features.zarr")
    parts_before = {s: [p.name for p in FeatureStore.open(store_url).parts(s)] for s in ("train", "test")}
    assert main(["train", "tweets-minilm", "-q", "--run", "unipt", *args]) == 0
    assert "| unipt " in capsys.readouterr().out
    assert not (tmp_path / "checkpoints" / "linear_probe").exists()

    assert main(["eval", str(tmp_path / "checkpoints" / "unipt"), "--store", store_url, "--split", "test", "-q"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n"] == FeatureStore.open(store_url).num_examples("test")

    # `run` on a complete store extracts nothing again.
    assert main(["run", "tweets-minilm", "-q", *args]) == 0
    assert "extracted 0 examples (0 tokens) into 0 parts" in capsys.readouterr().out
    assert {s: [p.name for p in FeatureStore.open(store_url).parts(s)] for s in ("train", "test")} == parts_before


def test_overrides_are_typed_and_unknown_keys_are_refused(capsys):
    recipe = load_recipe("tweets-minilm", ["train.unipt.lr=1e-3", "train.unipt.model.reduction=8",
                                           "extract.layers=[0, 6]", "source.max_examples={train=10}", "workdir=out"])
    assert recipe.train["unipt"].lr == 1e-3 and recipe.train["unipt"].model["reduction"] == 8
    assert list(recipe.extract.layers) == [0, 6] and recipe.source.max_examples == {"train": 10}
    assert recipe.store == "out/features.zarr"

    with pytest.raises(ValueError, match=r"unknown key\(s\) \['batchsize'\] in \[extract\]; valid keys: .*'batch_size'"):
        load_recipe("tweets-minilm", ["extract.batchsize=4"])
    with pytest.raises(ValueError, match=r"unknown unipt model option\(s\) \['reductoin'\]; valid: .*'reduction'"):
        load_recipe("tweets-minilm", ["train.unipt.model.reductoin=4"])
    with pytest.raises(ValueError, match=r"unknown method 'lora'; available: \[.*'linear_probe', 'lst', .*'scalar_mix', .*'unipt', 'unipt_cnn'\]"):
        load_recipe("tweets-minilm", ["train.unipt.method=lora"])
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        load_recipe("tweets-minilm", ["train.unipt.lr"])
    with pytest.raises(ValueError, match=r"\[train.unipt\]: lr must be positive"):
        load_recipe("tweets-minilm", ["train.unipt.lr=-1"])

    # The command reports the same errors in one line, exit code 2.
    assert main(["extract", "tweets-minilm", "extract.batchsize=4"]) == 2
    assert "unknown key(s) ['batchsize'] in [extract]" in capsys.readouterr().err


def test_a_bare_word_override_is_a_string_and_sections_cannot_be_overwritten():
    document = {"source": {"path": "a.csv"}}
    apply_override(document, "source.text_column=tweet")
    assert document["source"]["text_column"] == "tweet"
    with pytest.raises(ValueError, match="is a value, not a section"):
        apply_override(document, "source.path.x=1")


def test_a_recipe_needs_a_train_section():
    with pytest.raises(ValueError, match=r"at least one \[train.<run name>\]"):
        build_recipe({"source": {"path": "x.csv"}, "backbone": {"model": "m"}})


def test_recipes_command_lists_and_prints(capsys):
    assert main(["recipes"]) == 0
    assert "tweets-minilm" in capsys.readouterr().out
    assert main(["recipes", "tweets-minilm"]) == 0
    assert "[train.unipt]" in capsys.readouterr().out
    assert main(["run", "no-such-recipe"]) == 2
    assert f"not a shipped recipe ({', '.join(sorted(shipped_recipes()))})" in capsys.readouterr().err


def test_store_commands_info_ls_verify_rm_part(tiny_bert_dir, text_csv, tmp_path, capsys):
    args = tiny_overrides(tiny_bert_dir, text_csv, tmp_path / "work", [])
    assert main(["extract", "tweets-minilm", "-q", *args]) == 0
    url = str(tmp_path / "work" / "features.zarr")
    capsys.readouterr()

    assert main(["store", "info", url]) == 0
    out = capsys.readouterr().out
    assert "float16, lz4" in out and "BertModel" in out and "bytes per stored value" in out
    assert main(["store", "info", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert sum(s["examples"] for s in info["splits"].values()) == 120

    assert main(["store", "ls", str(tmp_path / "work")]) == 0
    assert url in capsys.readouterr().out

    assert main(["store", "verify", url]) == 0
    assert "OK" in capsys.readouterr().out
    # damage one object: verify names it and fails; rm-part + re-extract repairs the store
    chunk = next(p for p in (tmp_path / "work" / "features.zarr" / "train" / "part-000000").rglob("c/*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[::-1])
    assert main(["store", "verify", url]) == 1
    assert "corrupt    train/part-000000/" in capsys.readouterr().out
    assert main(["store", "rm-part", url, "train", "part-000000"]) == 0
    assert main(["extract", "tweets-minilm", "-q", *args]) == 0
    assert main(["store", "verify", url]) == 0
    assert main(["store", "rm-part", url, "train", "part-000099"]) == 2
    assert "no part train/part-000099" in capsys.readouterr().err


def test_store_export_command_writes_webdataset_shards(tiny_bert_dir, text_csv, tmp_path, capsys):
    args = tiny_overrides(tiny_bert_dir, text_csv, tmp_path / "work", [])
    assert main(["extract", "tweets-minilm", "-q", *args]) == 0
    url = str(tmp_path / "work" / "features.zarr")
    assert main(["store", "export", url, str(tmp_path / "wds"), "--split", "test", "--layers", "0,2"]) == 0
    manifest = json.loads((tmp_path / "wds" / "manifest.json").read_text())
    assert list(manifest["splits"]) == ["test"]
    assert manifest["splits"]["test"]["examples"] == FeatureStore.open(url).num_examples("test")
    assert sorted(p.name for p in (tmp_path / "wds").glob("*.tar")) == ["test-000000.tar"]


def test_training_refuses_a_store_from_another_backbone(tiny_bert_dir, text_csv, tmp_path, capsys):
    from conftest import make_tiny_bert

    args = tiny_overrides(tiny_bert_dir, text_csv, tmp_path / "work", ["unipt"])
    assert main(["extract", "tweets-minilm", "-q", *args]) == 0
    other = make_tiny_bert(tmp_path / "other-bert", seed=1)
    capsys.readouterr()
    assert main(["train", "tweets-minilm", "-q", "--run", "unipt", *args, f"backbone.model='{other}'"]) == 2
    err = capsys.readouterr().err
    assert "was not extracted with the recipe's backbone" in err and "weights_sha256: expected" in err


# --------------------------------------------------------------------------- sweeps
SWEEP = 'train.unipt.sweep={lr=[1e-4, 5e-4], "model.reduction"=[2, 4], seed=[0, 1]}'


def test_a_sweep_section_expands_into_named_runs():
    recipe = load_recipe("tweets-minilm", [SWEEP])
    names = list(recipe.train)
    assert len(names) == 9 and names[-1] == "linear_probe"
    assert names[0] == "unipt@lr=0.0001,model.reduction=2,seed=0"
    assert recipe.sections == {"unipt": names[:8], "linear_probe": ["linear_probe"]}
    run = recipe.train["unipt@lr=0.0005,model.reduction=4,seed=1"]
    assert (run.lr, run.model, run.seed, run.epochs) == (5e-4, {"reduction": 4}, 1, 5)
    assert recipe.raw["train"]["unipt"]["sweep"]["lr"] == [1e-4, 5e-4]  # the resolved recipe keeps the sweep
    # a section name picks all its runs, a run name picks one
    assert select_runs(recipe, ["unipt"]) == names[:8]
    assert select_runs(recipe, [names[3], "linear_probe", names[3]]) == [names[3], "linear_probe"]
    with pytest.raises(ValueError, match=r"no run\(s\) \['unipt@lr=1'\] in recipe 'tweets-minilm'; "
                                         r"its runs are .*; or a sweep's section, for all its runs: \['unipt'\]"):
        select_runs(recipe, ["unipt@lr=1"])


def test_unknown_sweep_keys_and_bad_sweeps_are_refused():
    with pytest.raises(ValueError, match=r"\[train.unipt\] sweep: unknown sweep key\(s\) \['lr_', 'model.reductoin'\]; "
                                         r"valid keys: \[.*'lr'.*'seed'.*'model.reduction'.*\]"):
        load_recipe("tweets-minilm", ['train.unipt.sweep={lr_=[1], "model.reductoin"=[2]}'])
    with pytest.raises(ValueError, match=r"\[train.unipt\]: sweep must be a table of lists"):
        load_recipe("tweets-minilm", ["train.unipt.sweep=3"])
    with pytest.raises(ValueError, match=r"\[train.unipt\] sweep: sweep values must be a non-empty list, got lr = 0.001"):
        load_recipe("tweets-minilm", ["train.unipt.sweep={lr=1e-3}"])
    with pytest.raises(ValueError, match=r"sweep run 'unipt@model.reduction=0': reduction must be >= 1"):
        load_recipe("tweets-minilm", ['train.unipt.sweep={"model.reduction"=[2, 0]}'])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['sweeep'\] in \[train.unipt\]; valid keys: .*'sweep'"):
        load_recipe("tweets-minilm", ["train.unipt.sweeep={lr=[1e-3]}"])
    with pytest.raises(ValueError, match=r"\[train.a\] makes run\(s\) \['a@seed=1'\] that another"):
        build_recipe({"train": {"a@seed=1": {}, "a": {"sweep": {"seed": [1]}}}})


SWEEP_TRAIN = """
[train.unipt]
epochs = 2
batch_size = 8
device = "cpu"
data_seed = 0
sweep = { lr = [1e-3, 2e-2], seed = [0, 1, 2] }

[train.probe]
method = "linear_probe"
lr = 1e-2
epochs = 1
batch_size = 16
device = "cpu"
"""


def test_train_stage_trains_compatible_runs_in_one_pass_and_ranks_them(tmp_path, monkeypatch):
    from conftest import write_store_recipe, write_tiny_store

    from unipt.pipelines import _stages

    store = write_tiny_store(str(tmp_path / "store.zarr"))
    path = write_store_recipe(tmp_path / "tiny-sweep.toml", store.url, tmp_path / "work", SWEEP_TRAIN)
    recipe = load_recipe(str(path))
    passes = []
    fit_many = _stages.fit_many
    monkeypatch.setattr(_stages, "fit_many", lambda runs, *a, **k: passes.append(list(runs)) or fit_many(runs, *a, **k))

    results = train_stage(recipe, progress=False)
    assert [r.name for r in results] == list(recipe.train)  # recipe order
    assert [len(p) for p in passes] == [6, 1]  # the probe's batch size differs: a pass of its own
    assert {r.runs_in_pass for r in results} == {6, 1}
    table = results_table(results)
    eval_accuracy = [float(line.split("|")[6]) for line in table.splitlines()[2:9]]
    assert eval_accuracy == sorted(eval_accuracy, reverse=True)  # ranked by eval accuracy
    assert "Runs trained in one pass over the store share its time" in table
    assert "| unipt@lr=0.001 (3 seeds) " in table and "| unipt@lr=0.02 (3 seeds) " in table and "0, 1, 2" in table
    accuracies = [r.test_metrics["accuracy"] for r in results if r.config["lr"] == 0.02]
    mean, std = sum(accuracies) / 3, (sum((a - sum(accuracies) / 3) ** 2 for a in accuracies) / 2) ** 0.5
    assert f"{mean:.4f} ± {std:.4f}" in table
    write_report(recipe, results, None)
    summary = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert summary["runs"][0]["config"]["data_seed"] == 0 and summary["runs"][0]["runs_in_pass"] == 6
    # the sweep's plot (the probe is a section of one run: no plot), linked from summary.md
    assert sorted(p.name for p in (tmp_path / "work").glob("*.svg")) == ["sweep-unipt.svg"]
    assert "![unipt](sweep-unipt.svg)" in (tmp_path / "work" / "summary.md").read_text()
    assert "<svg" in (tmp_path / "work" / "sweep-unipt.svg").read_text()

    # --separate: one pass per run, the same numbers; a section name picks its runs
    passes.clear()
    separate = train_stage(replace(recipe, workdir=str(tmp_path / "separate")), ["unipt"], separate=True,
                           progress=False)
    assert [len(p) for p in passes] == [1] * 6 and [r.name for r in separate] == list(recipe.train)[:6]
    for a, b in zip(results, separate):  # (stacked runs, stack = "auto": equal to float rounding)
        assert a.test_metrics == pytest.approx(b.test_metrics, abs=1e-6) and b.runs_in_pass == 1
        assert a.eval_metrics == pytest.approx(b.eval_metrics, abs=1e-6)
