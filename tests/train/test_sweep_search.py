"""Searches: sweeps with ranges parsed into optuna distributions; ask / report / tell against a fake objective;
successive halving prunes; a search re-opened on its journal goes on; seeded samplers repeat themselves."""

from __future__ import annotations

import math
import sys

import pytest

optuna = pytest.importorskip("optuna")

from unipt.train import SearchConfig, SweepSearch, TrainConfig, parse_space  # noqa: E402

BASE = TrainConfig(epochs=9, device="cpu")
SPACE = {"lr": {"low": 1e-5, "high": 1e-1, "log": True}, "model.reduction": [2, 4, 8]}


def score(config: TrainConfig, epoch: int) -> float:
    """A fake eval curve: best near lr = 1e-3 with reduction 4, rising a little with every epoch."""
    return -abs(math.log10(config.lr) + 3) - 0.1 * abs(config.model["reduction"] - 4) + 0.05 * epoch


def run_search(search: SweepSearch, parallel: int) -> int:
    """Drive ``search`` to the end of its budget as the search stage does; the epochs trained in all."""
    trained = 0
    while search.remaining:
        for name, config in search.ask(parallel).items():
            pruned = False
            for epoch in range(1, config.epochs + 1):
                trained += 1
                value = score(config, epoch)
                if epoch < config.epochs and search.report(name, epoch, value):
                    pruned = True
                    break
            search.tell(name, value, pruned=pruned)
    return trained


def new_search(tmp_path=None, space=SPACE, **config) -> SweepSearch:
    storage = None if tmp_path is None else tmp_path / "search.journal"
    return SweepSearch("unipt", BASE, parse_space(space, BASE), SearchConfig(**config), "maximize", storage)


# --------------------------------------------------------------------------- the space
def test_lists_are_choices_and_tables_are_ranges():
    space = parse_space({"lr": {"low": 1e-5, "high": 1e-2, "log": True}, "weight_decay": {"low": 0.0, "high": 0.1},
                         "batch_size": {"low": 8, "high": 32, "step": 8}, "model.reduction": [2, 4, 8],
                         "model.layers": ["all", [0, 2]]}, BASE)
    assert space["lr"] == optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)
    assert space["weight_decay"] == optuna.distributions.FloatDistribution(0.0, 0.1)
    assert space["batch_size"] == optuna.distributions.IntDistribution(8, 32, step=8)
    assert space["model.reduction"] == optuna.distributions.CategoricalDistribution([2, 4, 8])
    assert space["model.layers"].choices == ("all", "[0, 2]")  # arrays are held as JSON text ...


def test_array_choices_come_back_as_arrays():
    search = new_search(space={"model.layers": ["all", [0, 2]]}, trials=6, parallel=6, sampler="random")
    layers = [config.model["layers"] for config in search.ask(6).values()]
    assert sorted(map(str, layers)) == sorted(map(str, [r.params["model.layers"] for r in search.records()]))
    assert {str(value) for value in layers} == {"all", "[0, 2]"}  # ... and read back as arrays


@pytest.mark.parametrize("sweep, message", [
    ({"lr": {"low": 1e-2, "high": 1e-5}}, r"lr: low = 0.01 must be below high = 1e-05"),
    ({"lr": {"low": 0.0, "high": 1e-2, "log": True}}, r"lr: a log range needs low > 0, got low = 0.0"),
    ({"lrr": [1e-3]}, r"unknown sweep key\(s\) \['lrr'\]; valid keys: \[.*'lr'.*'model.reduction'"),
    ({"lr": {"low": 1e-5}}, r"no high; a range takes \['low', 'high', 'log', 'step'\]"),
    ({"lr": {"low": 1e-5, "high": 1e-2, "scale": "log"}}, r"unknown key\(s\) \['scale'\]"),
    ({"lr": {"low": "a", "high": 1e-2}}, r"lr: low = 'a' is not a number"),
    ({"lr": 1e-3}, r"lr = 0.001: expected a list of choices or a range"),
    ({"lr": []}, r"lr = \[\]: give at least one choice"),
    ({"lr": [1e-3, 1e-3]}, r"repeats a choice"),
    ({"device": ["cpu", "[cuda]"]}, r"a string choice cannot begin with \[ or \{"),
    ({"weight_decay": {"low": 0, "high": 1}}, r"both ends are integers.*write low = 0.0"),
    ({"epochs": {"low": 1.0, "high": 4.0}}, r"epochs takes integers"),
    ({"lr": {"low": 1e-5, "high": 1e-2, "log": True, "step": 1e-5}}, r"either log-spaced or stepped"),
    ({"batch_size": {"low": 8, "high": 30, "step": 8}}, r"not a whole number of steps of 8; set high = 24"),
    ({"lr": {"low": -1.0, "high": 1e-2}}, r"lr = -1.0: lr must be positive"),
    ({"model.reduction": [2, 0]}, r"model.reduction = 0: "),
    ({"method": ["unipt", "linear_probe"], "model.reduction": [2]}, r"model.reduction = 2 with method 'linear_probe'"),
    ({"select_metric": ["accuracy", "macro_f1"]}, r"cannot vary \['select_metric'\]"),
    ({}, r"a search needs a sweep"),
])
def test_a_bad_space_is_refused_naming_the_fix(sweep, message):
    with pytest.raises(ValueError, match=message):
        parse_space(sweep, BASE)


def test_a_search_config_names_the_bad_value_and_the_choices():
    with pytest.raises(ValueError, match=r"sampler must be one of \('random', 'tpe'\), got 'grid'"):
        SearchConfig(sampler="grid")
    with pytest.raises(ValueError, match=r"prune must be one of \('asha', 'none'\), got 'median'"):
        SearchConfig(prune="median")
    with pytest.raises(ValueError, match=r"reduction_factor must be >= 2, got 1"):
        SearchConfig(reduction_factor=1)
    with pytest.raises(ValueError, match=r"trials must be >= 1, got 0"):
        SearchConfig(trials=0)


# --------------------------------------------------------------------------- ask, report, tell
def test_a_search_spends_its_budget_and_asha_prunes_weak_trials():
    optuna.logging.set_verbosity(optuna.logging.INFO)
    search = new_search(trials=12, parallel=4, prune="asha", min_epochs=1, reduction_factor=3, sampler="random")
    trained = run_search(search, parallel=4)
    records = search.records()
    assert [r.name for r in records] == [f"unipt@trial={k:02d}" for k in range(12)]  # padded to the budget
    assert search.remaining == 0 and search.ask(4) == {}
    pruned = [r for r in records if r.state == "pruned"]
    assert pruned and all(r.pruned_at in (1, 3) for r in pruned)  # at the rungs: 1 and 3 epochs
    assert {r.state for r in records} == {"complete", "pruned"}
    assert trained < 12 * BASE.epochs
    for r in records:  # the best value told, the params each trial was trained with
        config = TrainConfig(lr=r.params["lr"], model={"reduction": r.params["model.reduction"]})
        assert r.value == pytest.approx(score(config, r.pruned_at or BASE.epochs))
    assert optuna.logging.get_verbosity() == optuna.logging.WARNING  # no optuna log line per trial


def test_without_pruning_every_trial_trains_out():
    search = new_search(trials=5, parallel=2, prune="none")
    assert run_search(search, parallel=2) == 5 * BASE.epochs
    assert {r.state for r in search.records()} == {"complete"}


def test_ask_gives_configs_and_refuses_unknown_names():
    search = new_search(trials=3, parallel=2)
    wave = search.ask(2)
    assert list(wave) == ["unipt@trial=0", "unipt@trial=1"] and search.remaining == 1
    config = wave["unipt@trial=0"]
    assert 1e-5 <= config.lr <= 1e-1 and config.model["reduction"] in (2, 4, 8) and config.epochs == 9
    with pytest.raises(ValueError, match=r"'unipt@trial=7' is not a trial in flight.*'unipt@trial=0'"):
        search.report("unipt@trial=7", 1, 0.5)
    search.tell("unipt@trial=0", float("nan"))  # a diverged run fails
    assert [r.state for r in search.records()][:1] == ["fail"]
    with pytest.raises(ValueError, match="not a trial in flight"):
        search.tell("unipt@trial=0", 0.5)


# --------------------------------------------------------------------------- resume
def test_a_reopened_search_reruns_its_unfinished_trials_first_then_goes_on(tmp_path):
    first = new_search(tmp_path, trials=6, parallel=3, sampler="tpe")
    wave = first.ask(3)
    names = list(wave)
    first.report(names[1], 1, 0.3)
    first.tell(names[0], 0.5)  # finished; names[1] and names[2] were training when the session died
    del first

    again = new_search(tmp_path, trials=6, parallel=3, sampler="tpe")
    assert again.remaining == 5
    resumed = again.ask(3)
    assert list(resumed) == [names[1], names[2], "unipt@trial=3"]  # the unfinished first, numbering goes on
    assert resumed[names[1]] == wave[names[1]] and resumed[names[2]] == wave[names[2]]  # same params
    assert again.report(names[1], 1, 0.3) is False  # an epoch reported before is not reported twice
    states = {r.name: r.state for r in again.records()}
    assert states[names[0]] == "complete" and states[names[1]] == "running"
    for name in resumed:
        again.tell(name, 0.4)
    assert again.remaining == 2
    assert list(again.ask(5)) == ["unipt@trial=4", "unipt@trial=5"]


def test_a_trial_pruned_by_a_session_that_died_before_telling_it_stays_pruned(tmp_path):
    first = new_search(tmp_path, trials=4, parallel=3, reduction_factor=2)
    names = list(first.ask(3))
    assert first.report(names[0], 1, 1.0) is False  # the first at a rung goes on
    assert first.report(names[1], 1, 0.0) is True  # worse than the best half of its rung: pruned
    del first

    again = new_search(tmp_path, trials=4, parallel=3, reduction_factor=2)
    record = again.records()[1]
    assert (record.name, record.state, record.value, record.pruned_at) == (names[1], "pruned", 0.0, 1)
    assert list(again.ask(3)) == [names[0], names[2], "unipt@trial=3"]


def test_a_journal_of_another_search_is_refused(tmp_path):
    new_search(tmp_path, trials=4).ask(1)
    with pytest.raises(ValueError, match=r"holds another search of \[train.unipt\] \(its \['space'\] differ\)"):
        new_search(tmp_path, space={"lr": {"low": 1e-4, "high": 1e-1, "log": True}}, trials=4)
    with pytest.raises(ValueError, match=r"its \['search'\] differ"):
        new_search(tmp_path, trials=4, sampler="random")
    assert new_search(tmp_path, trials=8).remaining == 8  # a larger budget continues the same search


# --------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_seeded_sampler_draws_the_same_trials(sampler):
    def drawn(seed):
        search = new_search(trials=14, parallel=4, sampler=sampler, seed=seed, prune="none")
        run_search(search, parallel=4)
        return [r.params for r in search.records()]

    assert drawn(0) == drawn(0)
    assert drawn(0) != drawn(1)
    assert len({p["lr"] for p in drawn(0)}) == 14  # no trial repeats another


def test_a_search_resumed_between_waves_draws_what_it_would_have_drawn(tmp_path):
    whole = new_search(trials=8, parallel=4, sampler="random", prune="none")
    run_search(whole, parallel=4)

    first = new_search(tmp_path, trials=8, parallel=4, sampler="random", prune="none")
    for name, config in first.ask(4).items():
        first.tell(name, score(config, BASE.epochs))
    again = new_search(tmp_path, trials=8, parallel=4, sampler="random", prune="none")
    run_search(again, parallel=4)
    assert [r.params for r in again.records()] == [r.params for r in whole.records()]


def test_without_optuna_a_search_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now fails, as when it is not installed
    with pytest.raises(ImportError, match=r"pip install 'unipt\[tune\]'"):
        parse_space(SPACE, BASE)
