"""unipt.pipelines — recipes (TOML files) and the `unipt` command that wires extract -> store -> train."""

from ._inference import Predictions, SideNetworkPredictor
from ._memory import PeakMemory
from ._online import OnlineRunResult, fit_online
from ._recipe import Recipe, apply_override, build_recipe, find_recipe, load_recipe, make_config, shipped_recipes
from ._stages import extract_stage, results_table, train_stage, write_report

__all__ = [
    "Recipe",
    "load_recipe",
    "build_recipe",
    "find_recipe",
    "shipped_recipes",
    "apply_override",
    "make_config",
    "extract_stage",
    "train_stage",
    "results_table",
    "write_report",
    "SideNetworkPredictor",
    "Predictions",
    "fit_online",
    "OnlineRunResult",
    "PeakMemory",
]
