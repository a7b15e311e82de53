"""A [train.<section>] with a ``search`` table: parsed and checked when the recipe loads, and searched end to end
on a tiny store (waves of trials from one pass over it, weak ones pruned, a finished search not trained again)."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib

import pytest

pytest.importorskip("optuna")

from conftest import write_store_recipe, write_tiny_store  # noqa: E402
from unipt.pipelines import build_recipe, load_recipe  # noqa: E402
from unipt.pipelines import _tune  # noqa: E402
from unipt.pipelines._tune import search_stage  # noqa: E402
from unipt.train import SearchConfig  # noqa: E402
from test_retrieval_recipes import RETRIEVAL_RECIPE  # noqa: E402

SEARCH_TRAIN = """
[train.unipt_search]
method = "unipt"
epochs = 4
batch_size = 8
data_seed = 0
device = "cpu"
select_metric = "loss"
sweep = { lr = {low = 1e-4, high = 3e-2, log = true}, "model.reduction" = [2, 4] }
search = { sampler = "random", trials = 6, parallel = 3, prune = "asha", min_epochs = 1, reduction_factor = 2 }

[train.probe]
method = "linear_probe"
epochs = 1
device = "cpu"
"""

DOCUMENT = """
name = "r"
[source]
path = "unused.csv"
[backbone]
model = "m"
[train.s]
epochs = 6
[train.s.sweep]
lr = {low = 1e-5, high = 1e-2, log = true}
"model.reduction" = [2, 4, 8]
weight_decay = {low = 0.0, high = 0.1}
[train.s.search]
sampler = "tpe"
trials = 32
parallel = 8
prune = "asha"
min_epochs = 1
reduction_factor = 3
seed = 0
"""


def document(**section):
    """DOCUMENT with [train.s]'s keys replaced (None: removed)."""
    doc = tomllib.loads(DOCUMENT)
    for key, value in section.items():
        if value is None:
            doc["train"]["s"].pop(key)
        else:
            doc["train"]["s"][key] = value
    return doc


def test_a_search_section_is_parsed_into_a_search_and_makes_no_runs_up_front():
    recipe = build_recipe(document())
    assert recipe.sections == {"s": []} and recipe.train == {}
    search = recipe.searches["s"]
    assert search.config == SearchConfig(sampler="tpe", trials=32, parallel=8, prune="asha", min_epochs=1,
                                         reduction_factor=3, seed=0)
    assert search.base.epochs == 6 and search.base.method == "unipt"
    assert sorted(search.space) == ["lr", "model.reduction", "weight_decay"]
    assert search.space["lr"].log and search.space["model.reduction"].choices == (2, 4, 8)
    assert dataclasses.replace(recipe, workdir="elsewhere").searches == recipe.searches
    # a plain sweep stays a grid
    grid = build_recipe(document(sweep={"lr": [1e-3, 1e-2]}, search=None))
    assert grid.searches == {} and grid.sections == {"s": ["s@lr=0.001", "s@lr=0.01"]}


@pytest.mark.parametrize("section, message", [
    ({"search": None}, "[train.s] sweep: ['lr', 'weight_decay'] are ranges, which only a search draws from: add "
                       "search = { sampler = \"tpe\", trials = 32 } to the section, or give lists of values (a grid)"),
    ({"sweep": {"lrr": [1e-3]}}, "[train.s] sweep: unknown sweep key(s) ['lrr']; valid keys: ['batch_size'"),
    ({"sweep": {"lr": {"low": 1e-2, "high": 1e-5}}}, "[train.s] sweep: lr: low = 0.01 must be below high = 1e-05"),
    ({"sweep": {"lr": {"low": 0.0, "high": 1e-2, "log": True}}},
     "[train.s] sweep: lr: a log range needs low > 0, got low = 0.0"),
    ({"sweep": {"lr": {"low": "a", "high": 1e-2}}}, "[train.s] sweep.lr = 'a': expected a number"),
    ({"sweep": {"model.reduction": {"low": 2, "high": "8"}}},
     "[train.s] sweep.model.reduction = '8': expected an integer"),
    ({"sweep": {"model.reduction": ["x"]}}, "[train.s] sweep.model.reduction = ['x']: expected an array of integers"),
    ({"search": {"sampler": "grid"}}, "[train.s] search: sampler must be one of ('random', 'tpe'), got 'grid'"),
    ({"search": {"trials": "many"}}, "[train.s] search trials = 'many': expected an integer"),
    ({"search": {"budget": 3}}, "unknown key(s) ['budget'] in [train.s] search; valid keys: ['min_epochs', 'parallel'"),
    ({"search": 3}, "[train.s] search must be a table of options, got 3"),
    ({"eval_split": ""}, "[train.s] sweep: a search compares its trials on the eval split, but eval_split is empty"),
])
def test_a_bad_search_section_is_refused_naming_the_fix(section, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        build_recipe(document(**section))


def test_a_retrieval_recipe_refuses_a_search():
    towers = RETRIEVAL_RECIPE[:RETRIEVAL_RECIPE.index("[train.a]")]  # the retrieval recipe test's two towers
    doc = tomllib.loads(towers + """
[train.a]
sweep = { lr = {low = 1e-5, high = 1e-2} }
search = { trials = 4 }
""")
    with pytest.raises(ValueError, match=r"\[train.a\]: a retrieval recipe cannot search"):
        build_recipe(doc)


def test_search_stage_trains_waves_prunes_weak_trials_and_resumes_finished(tmp_path, monkeypatch):
    store = write_tiny_store(str(tmp_path / "store.zarr"))
    path = write_store_recipe(tmp_path / "tiny-search.toml", store.url, tmp_path / "work", SEARCH_TRAIN)
    recipe = load_recipe(str(path))
    assert recipe.sections["unipt_search"] == [] and list(recipe.train) == ["probe"]
    passes = []
    fit_many = _tune.fit_many
    monkeypatch.setattr(_tune, "fit_many", lambda runs, *a, **k: passes.append(list(runs)) or fit_many(runs, *a, **k))

    results = search_stage(recipe, "unipt_search", store, progress=False)
    assert [r.name for r in results] == [f"unipt_search@trial={k}" for k in range(6)]
    assert passes == [[f"unipt_search@trial={k}" for k in range(3)], [f"unipt_search@trial={k}" for k in range(3, 6)]]
    pruned = [r for r in results if r.pruned_at is not None]
    survivors = [r for r in results if r.pruned_at is None]
    assert pruned and survivors
    for r in pruned:
        assert r.test_metrics is None and len(r.history) == r.pruned_at < 4
    for r in survivors:
        assert r.test_metrics and "loss" in r.test_metrics and len(r.history) == 4
    assert sum(len(r.history) for r in results) < 6 * 4  # run-epochs trained
    assert {r.select_metric for r in results} == {"loss"}
    log = [json.loads(line) for line in recipe.metrics_log.read_text().splitlines()]
    assert sorted(rec["run"] for rec in log if rec.get("pruned")) == sorted(r.name for r in pruned)

    journal = tmp_path / "work" / "search-unipt_search.journal"
    assert journal.is_file()
    from unipt.train import _trainer

    def no_training(*args, **kwargs):
        raise AssertionError("a finished trial was trained again")

    monkeypatch.setattr(_trainer, "_train_pass", no_training)  # all done already: every result is read back
    again = search_stage(recipe, "unipt_search", store, progress=False)
    assert [r.__dict__ for r in again] == [r.__dict__ for r in results]

    with pytest.raises(ValueError, match=r"\[train.probe\] is not a search in recipe 'tiny-search'; its searches: "
                                         r"\['unipt_search'\]"):
        search_stage(recipe, "probe", store, progress=False)
