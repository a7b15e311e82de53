"""Recipes and the `unipt` command: every shipped recipe loads and runs end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unipt.pipelines import apply_override, build_recipe, load_recipe, shipped_recipes
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


def test_a_recipe_ships():
    assert "tweets-minilm" in shipped_recipes()


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_runs_a_few_steps(name, tiny_bert_dir, text_csv, tmp_path, capsys):
    runs = list(load_recipe(name).train)
    code = main(["run", name, "-q", *tiny_overrides(tiny_bert_dir, text_csv, tmp_path / "work", runs)])
    assert code == 0
    out = capsys.readouterr().out
    for run in runs:
        assert f"| {run} " in out  # one table row per run
        checkpoint = tmp_path / "work" / "checkpoints" / run
        assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "config.json").is_file()
    store = FeatureStore.open(str(tmp_path / "work" / "features.zarr"))
    assert store.num_examples("train") + store.num_examples("validation") + store.num_examples("test") == 120
    summary = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == runs
    assert all(r["test_metrics"]["n"] == store.num_examples("test") for r in summary["runs"])
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
    with pytest.raises(ValueError, match=r"unknown method 'lora'; available: \['linear_probe', 'lst', 'scalar_mix', 'unipt'\]"):
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
    assert "not a shipped recipe (tweets-minilm" in capsys.readouterr().err


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
