"""Retrieval recipes through the CLI: every shipped one runs end to end on synthetic data in its own columns (tiny
models), and a retrieval recipe's sections are checked as it loads."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest

from unipt.extract import ImageSourceConfig
from unipt.pipelines import load_recipe, shipped_recipes
from unipt.pipelines._recipe import RetrievalRecipe, build_recipe, recipe_has_towers
from unipt.pipelines.cli import main
from unipt.store import FeatureStore, PairIndex

WORDS = "the a river stone light dark king house wind sea bread fire song road tree bird".split()
RETRIEVAL_RECIPES = sorted(name for name, path in shipped_recipes().items() if recipe_has_towers(str(path)))


def write_table(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(path, "w", newline="") as f:
            out = csv.DictWriter(f, list(rows[0]))
            out.writeheader()
            out.writerows(rows)
    return path


def synthetic_towers(recipe: RetrievalRecipe, folder: Path, image_folder: Path) -> list[str]:
    """Tables in the recipe's own columns: documents (texts, or the generated images), two captions per document
    (queries), and the pair table; the overrides that point the recipe at them."""
    rng = random.Random(0)
    document, query = recipe.towers["document"].source, recipe.towers["query"].source
    images = sorted(image_folder.rglob("*.png"))
    n = len(images) if isinstance(document, ImageSourceConfig) else 40
    docs, queries, pairs = [], [], []
    for k in range(n):
        doc_id, group = f"doc{k}", f"chapter{k % 10}"
        if isinstance(document, ImageSourceConfig):
            row = {document.image_column: os.path.relpath(images[k], folder), document.id_column: doc_id}
        else:
            row = {document.text_column: f"{' '.join(rng.sample(WORDS, 4))} w{k}", document.id_column: doc_id}
            if document.group_column:
                row[document.group_column] = group
        docs.append(row)
        for c in range(2):
            query_id = f"{doc_id}#{c}"
            row = {query.id_column: query_id, query.text_column: f"{' '.join(rng.sample(WORDS, 3))} w{k} c{c}"}
            if query.group_column:  # the document's split key: its group, or its id
                row[query.group_column] = group if getattr(document, "group_column", None) else doc_id
            queries.append(row)
            pairs.append({recipe.pairs.query_column: query_id, recipe.pairs.document_column: doc_id})
    suffix = {t: Path(recipe.towers[t].source.path).suffix for t in ("query", "document")}
    paths = {"query": write_table(folder / f"queries{suffix['query']}", queries),
             "document": write_table(folder / f"documents{suffix['document']}", docs),
             "pairs": write_table(folder / f"pairs{Path(recipe.pairs.path).suffix}", pairs)}
    return [f"towers.query.source.path='{paths['query']}'", f"towers.document.source.path='{paths['document']}'",
            f"pairs.path='{paths['pairs']}'"]


@pytest.mark.parametrize("name", RETRIEVAL_RECIPES)
def test_every_retrieval_recipe_runs_end_to_end(name, tiny_bert_dir, tiny_vit_dir, image_folder, tmp_path, capsys):
    recipe = load_recipe(name)
    assert isinstance(recipe, RetrievalRecipe)
    overrides = synthetic_towers(recipe, tmp_path, image_folder) + [f"workdir='{tmp_path / 'work'}'"]
    for tower, spec in recipe.towers.items():
        image = isinstance(spec.source, ImageSourceConfig)
        overrides += [f"towers.{tower}.backbone.model='{tiny_vit_dir if image else tiny_bert_dir}'",
                      f"towers.{tower}.source.max_examples={{}}", f"towers.{tower}.extract.part_size=16",
                      f"towers.{tower}.extract.batch_size=8"]
        if image:
            overrides.append(f"towers.{tower}.backbone.image_size=32")
    for run, config in recipe.train.items():
        overrides += [f"train.{run}.epochs=2", f"train.{run}.max_steps=3"]
        if config.task.get("residual") or config.method == "frozen":  # the tiny models are 32 wide
            overrides.append(f"train.{run}.task.embed_dim=32")
    assert main(["run", name, "-q", *overrides]) == 0
    out = capsys.readouterr().out
    work = tmp_path / "work"
    for run in recipe.train:
        assert f"| {run} " in out
        assert (work / "checkpoints" / run / "model.safetensors").is_file()
    stores = [FeatureStore.open(str(work / f"{t}.zarr")) for t in ("query", "document")]
    index = PairIndex.load(str(work / "pairs.json"))
    index.check_stores(*stores)
    assert sum(len(index.split(s).documents) for s in index.splits) == stores[1].num_examples("train") + \
        stores[1].num_examples("validation") + stores[1].num_examples("test")
    summary = json.loads((work / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == list(recipe.train)
    assert all(set(r["test_metrics"]) >= {"q2d_r1", "d2q_r10", "rsum"} for r in summary["runs"])
    assert set(summary["extraction"]) == {"query", "document"}
    # `unipt eval` scores a two-tower checkpoint from the stores its pair index names, as training did.
    first = summary["runs"][0]
    assert main(["eval", first["checkpoint"], "--pairs", str(work / "pairs.json"), "-q"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert {k: scored[k] for k in first["test_metrics"]} == pytest.approx(first["test_metrics"])
    assert main(["eval", first["checkpoint"], "--store", str(work / "query.zarr"), "-q"]) == 2
    assert "is a two-tower checkpoint: pass the pair index its recipe built" in capsys.readouterr().err


RETRIEVAL_RECIPE = """
name = "r"
[pairs]
path = "pairs.csv"
[towers.query.source]
path = "q.csv"
[towers.query.backbone]
model = "m"
[towers.document.source]
path = "d.csv"
[towers.document.backbone]
model = "m"
[train.a]
method = "{method}"
task = {task}
"""


def recipe_text(method="unipt", task="{}"):
    import tomllib

    return tomllib.loads(RETRIEVAL_RECIPE.format(method=method, task=task))


def test_a_retrieval_recipe_loads_with_default_stores():
    recipe = build_recipe(recipe_text(task="{ embed_dim = 64, loss = 'triplet' }"))
    assert isinstance(recipe, RetrievalRecipe)
    assert recipe.towers["query"].store == "runs/r/query.zarr" and recipe.pair_index == "runs/r/pairs.json"
    assert recipe.train["a"].task == {"embed_dim": 64, "loss": "triplet"}
    assert build_recipe(recipe_text(method="frozen")).train["a"].method == "frozen"


@pytest.mark.parametrize("change, message", [
    (lambda d: d["towers"].pop("document"), r"needs exactly the towers \['query', 'document'\]"),
    (lambda d: d.update(source={"path": "x"}), r"unknown key\(s\) \['source'\] in the retrieval recipe's top level"),
    (lambda d: d["train"]["a"].update(task={"loss": "hinge"}), r"\[train.a\] task: task.loss must be one of"),
    (lambda d: d["train"]["a"].update(task={"embedding": 3}), r"unknown retrieval option\(s\) \['embedding'\]"),
    (lambda d: d["train"]["a"].update(method="frozn"), r"unknown method 'frozn'; available: \['frozen', .*'linear_probe'"),
    (lambda d: d["towers"]["document"].update(store="runs/r/query.zarr"), "the two towers write one store"),
    (lambda d: d.pop("pairs"), r"\[pairs\]: \[pairs\] path is required"),
])
def test_a_bad_retrieval_recipe_is_refused_naming_the_fix(change, message):
    document = recipe_text()
    change(document)
    with pytest.raises(ValueError, match=message):
        build_recipe(document)
