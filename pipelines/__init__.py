"""unipt.pipelines — recipes (TOML files) and the `unipt` command that wires extract -> store -> train."""

from ._inference import Predictions, SideNetworkPredictor
from ._memory import PeakMemory
from ._online import OnlineRunResult, fit_online
from ._online_retrieval import train_online_retrieval
from ._recipe import PairsConfig, Recipe, RetrievalRecipe, Tower, apply_override, build_recipe, find_recipe, load_recipe, make_config, shipped_recipes
from ._retrieval import extract_towers, pair_index, train_retrieval_stage
from ._search import GalleryIndex, QueryEncoder, build_index
from ._stages import extract_stage, results_table, train_stage, write_report

__all__ = [
    "Recipe",
    "RetrievalRecipe",
    "Tower",
    "PairsConfig",
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
    "extract_towers",
    "pair_index",
    "train_retrieval_stage",
    "train_online_retrieval",
    "GalleryIndex",
    "QueryEncoder",
    "build_index",
    "SideNetworkPredictor",
    "Predictions",
    "fit_online",
    "OnlineRunResult",
    "PeakMemory",
]
