"""unipt.extract — run a frozen backbone once and write its per-layer activations to a feature store."""

from ._augment import Augmentation, augment_seed, dropout_seed
from ._backbone import PreparedPart, TextEncoder, TextInputs, backbone_hashes, resolve_model_dir
from ._image_sources import (BadImage, ImageExample, ImagePreprocessor, ImageSourceConfig, decode_image,
                             load_image_source)
from ._resolve import cache_dir, data_dir, resolve_path
from ._runner import (
    BackgroundWriter,
    ExtractSummary,
    PartTask,
    extract_part,
    load_examples,
    make_encoder,
    plan_parts,
    resolve_extract_layers,
    run_extraction,
)
from ._sources import BadInputError, Example, SourceData, hash_unit, load_source, read_rows, text_id
from ._stream import Piece, SourcePlan, plan_source, source_shards
from ._vision import VisionEncoder
from .config import BackboneConfig, ExtractConfig, SourceConfig

__all__ = [
    "SourceConfig",
    "BackboneConfig",
    "ExtractConfig",
    "Example",
    "BadInputError",
    "SourceData",
    "load_source",
    "read_rows",
    "text_id",
    "hash_unit",
    "resolve_path",
    "cache_dir",
    "data_dir",
    "resolve_model_dir",
    "backbone_hashes",
    "TextEncoder",
    "TextInputs",
    "VisionEncoder",
    "PreparedPart",
    "ImageSourceConfig",
    "ImageExample",
    "ImagePreprocessor",
    "BadImage",
    "decode_image",
    "load_image_source",
    "load_examples",
    "make_encoder",
    "run_extraction",
    "extract_part",
    "plan_parts",
    "PartTask",
    "plan_source",
    "SourcePlan",
    "Piece",
    "source_shards",
    "resolve_extract_layers",
    "BackgroundWriter",
    "ExtractSummary",
    "Augmentation",
    "augment_seed",
    "dropout_seed",
]
