"""The feature store: the contract between the dataset builder (writes) and the prior trainer (reads).

- :class:`FeatureSample` — one sample; :mod:`.schema` documents the on-disk layout and why fp16.
- :class:`FeatureWriter` — sharded, atomic, appendable writing.
- :class:`FeatureDataset` — map-style reading; :func:`collate_features` — pad a list of samples into a batch.
- :class:`FeatureStream` — sharded, rank/worker-aware, shuffled, exactly resumable stream of collated batches.
- :func:`validate_feature_store` / :func:`format_report` — integrity check (``lambda-eclipse features validate``).
- :func:`synthesize_features` — a synthetic store with learnable structure for debug training.
"""

from .block import FeatureBlock
from .collate import collate_block, collate_features, collate_parts
from .reader import FeatureDataset, ShardFiles, load_all, stored_source_ids
from .schema import FeatureSample, ShardInfo, StoreIndex, read_index, read_zero_image, write_zero_image
from .stream import FeatureStream
from .synth import SynthWorld, synthesize_features
from .validate import FeatureStoreReport, ShardProblem, format_report, validate_feature_store
from .writer import FeatureWriter

__all__ = [
    "FeatureBlock",
    "FeatureDataset",
    "FeatureSample",
    "FeatureStoreReport",
    "FeatureStream",
    "FeatureWriter",
    "ShardFiles",
    "ShardInfo",
    "ShardProblem",
    "StoreIndex",
    "SynthWorld",
    "collate_block",
    "collate_features",
    "collate_parts",
    "format_report",
    "load_all",
    "read_index",
    "read_zero_image",
    "stored_source_ids",
    "synthesize_features",
    "validate_feature_store",
    "write_zero_image",
]
