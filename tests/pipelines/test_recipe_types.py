"""Recipe values of the wrong type are refused when the recipe loads, naming the field, the value and the type."""

from __future__ import annotations

import dataclasses
import re

import pytest

from unipt.extract import BackboneConfig, ExtractConfig, ImageSourceConfig, SourceConfig
from unipt.pipelines import load_recipe
from unipt.pipelines._field_types import check_fields, check_value
from unipt.pipelines.cli import main
from unipt.train import LoaderConfig, TrainConfig
from unipt.train._methods import METHODS

# The shipped tweets-minilm recipe loads without reading its data, so overrides on it exercise every section.
REFUSED = [
    ('source.splits="train"', "[source] splits = 'train': expected a table of numbers"),
    ("source.max_examples=5", "[source] max_examples = 5: expected a table of integers"),
    ("source.max_examples={train=2.5}", "[source] max_examples = {'train': 2.5}: expected a table of integers"),
    ('source.dedupe="no"', "[source] dedupe = 'no': expected true or false"),
    ("source.label_column=3", "[source] label_column = 3: expected a string"),
    ("train.unipt.model=5", "[train.unipt] model = 5: expected a table of any values"),
    ('train.unipt.model.reduction="two"', "[train.unipt] model.reduction = 'two': expected an integer"),
    ("train.unipt.epochs=five", "[train.unipt] epochs = 'five': expected an integer"),
    ("train.unipt.epochs=2.5", "[train.unipt] epochs = 2.5: expected an integer"),
    ("train.unipt.lr=true", "[train.unipt] lr = True: expected a number"),
    ("train.unipt.method=[1]", "[train.unipt] method = [1]: expected a string"),
    ('train.unipt.sweep={lr=["a"]}', "[train.unipt] sweep.lr = ['a']: expected an array of numbers"),
    ('train.unipt.sweep={"model.reduction"=[2, "x"]}',
     "[train.unipt] sweep.model.reduction = [2, 'x']: expected an array of integers"),
    ('train.unipt.sweep={method=["unipt", 3]}', "[train.unipt] sweep.method = ['unipt', 3]: expected an array of strings"),
    # with the method swept, a model option is checked against every method that has it
    ('train.unipt.sweep={method=["unipt", "lst"], "model.layers"=["all", 5]}',
     "[train.unipt] sweep.model.layers = ['all', 5]: expected an array of strings or arrays of integers"),
    ("extract.batch_size=true", "[extract] batch_size = True: expected an integer"),
    ("extract.layers=5", "[extract] layers = 5: expected a string or an array of integers"),
    ('extract.layers=[0, "a"]', "[extract] layers = [0, 'a']: expected a string or an array of integers"),
    ('extract.splits="train"', "[extract] splits = 'train': expected an array of strings"),
    ("loader.mode=[1]", "[loader] mode = [1]: expected a string"),
    ("loader.memory_budget_gb=lots", "[loader] memory_budget_gb = 'lots': expected a number"),
    ('backbone.max_length="128"', "[backbone] max_length = '128': expected an integer"),
    ("backbone.image_size=1.5", "[backbone] image_size = 1.5: expected an integer"),
    ("source.modality=[1]", "[source] modality must be one of ['image', 'text'], got [1]"),
]


@pytest.mark.parametrize(("override", "message"), REFUSED, ids=[override for override, _ in REFUSED])
def test_a_value_of_the_wrong_type_is_refused_naming_field_value_and_type(override, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        load_recipe("tweets-minilm", [override])


def test_values_of_the_right_type_load():
    recipe = load_recipe("tweets-minilm", [
        "train.unipt.lr=1",  # an integer is a number
        "train.unipt.model.layers=[0, 6]", "extract.layers=[0, 6]", "extract.splits=[\"train\"]",
        "loader.memory_budget_gb=2", "source.dedupe=false", "source.max_examples={train=10}",
        'train.unipt.sweep={method=["unipt", "lst"], "model.layers"=["all", [0, 6]], seed=[0, 1]}',
    ])
    assert len(recipe.sections["unipt"]) == 8 and not recipe.source.dedupe
    assert list(recipe.extract.layers) == [0, 6] and recipe.loader.memory_budget_gb == 2


CONFIGS = [SourceConfig, ImageSourceConfig, BackboneConfig, ExtractConfig, LoaderConfig, TrainConfig,
           *(method.config_cls for method in METHODS.values())]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda cls: cls.__name__)
def test_every_config_field_has_an_annotation_the_check_understands(cls):
    # A field of a new annotation form makes the check raise TypeError here, rather than go unchecked.
    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}
    check_fields(cls, defaults, f"[{cls.__name__}]")


def test_an_annotation_form_the_check_does_not_know_fails_loudly():
    with pytest.raises(TypeError, match="recipes cannot check a field annotated set"):
        check_value({1}, set[int], "[x] y")


def test_the_command_reports_a_wrong_type_in_one_line(capsys):
    assert main(["train", "tweets-minilm", "train.unipt.epochs=five"]) == 2
    assert capsys.readouterr().err == "unipt train: error: [train.unipt] epochs = 'five': expected an integer\n"
    assert main(["extract", "tweets-minilm", 'source.dedupe="no"']) == 2
    assert capsys.readouterr().err == "unipt extract: error: [source] dedupe = 'no': expected true or false\n"
