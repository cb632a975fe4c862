"""`lambda-eclipse build-dataset` configuration: frozen dataclasses filled from YAML and dotted overrides
(`lambda-eclipse build-dataset --help-config` lists every key)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..hub import DEFAULT_ENCODERS
from .caption import DEFAULT_CAPTIONER
from .crop import DEFAULT_CROP_SIZE, RESAMPLE
from .filters import FilterConfig
from .ground import DEFAULT_DETECTOR
from .nouns import DEFAULT_SPACY_MODEL
from .segment import DEFAULT_SEGMENTER


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class InputConfig:
    """What to read."""

    path: str = _f("", "a folder of images (captions in sidecar .txt), webdataset .tar shards, or img2dataset output")
    max_pixels: int = _f(8192 * 8192, "images with more pixels are skipped and listed (decompression-bomb guard)")
    limit: int = _f(0, "use only the first N images (0: all)")


@dataclass(frozen=True)
class ModelsConfig:
    """The models of each stage (Hub ids or local folders); the ids used are recorded in the store's metadata."""

    captioner: str = _f(DEFAULT_CAPTIONER, "BLIP-2 for the caption stage; `none` keeps the input's own captions")
    spacy: str = _f(DEFAULT_SPACY_MODEL, "spaCy pipeline (package name or folder) for the nouns stage")
    detector: str = _f(DEFAULT_DETECTOR, "Grounding DINO for the ground stage")
    segmenter: str = _f(DEFAULT_SEGMENTER, "SAM for the segment stage")
    clip: str = _f(DEFAULT_ENCODERS, "CLIP encoders (repo with text_encoder/, image_encoder/, tokenizer/, "
                   "image_processor/) for the features stage; ViT-bigG/14 for the Kandinsky 2.2 prior")
    device: str = _f("auto", "cuda, cpu or auto (cuda when available)")
    dtype: str = _f("auto", "float32, float16, bfloat16 or auto (float16 on cuda, float32 on cpu)")


@dataclass(frozen=True)
class StageConfig:
    """Per-stage settings (batch sizes are images per model call)."""

    caption_batch: int = _f(16, "images per BLIP-2 call")
    caption_max_tokens: int = _f(30, "longest caption BLIP-2 may write, in tokens")
    caption_prompt: str = _f("", "optional BLIP-2 text prompt (empty: plain captioning)")
    max_nouns: int = _f(8, "most subject nouns taken from one caption")
    ground_batch: int = _f(8, "images per Grounding DINO call")
    box_threshold: float = _f(0.2, "Grounding DINO box threshold (paper: 0.2)")
    text_threshold: float = _f(0.2, "Grounding DINO text threshold (paper: 0.2)")
    segment_batch: int = _f(8, "images per SAM image-encoder call")
    crop_size: int = _f(DEFAULT_CROP_SIZE, "longer side of a subject crop on white (the CLIP input size)")
    crop_resample: str = _f("bicubic", "filter that resizes a crop: bicubic, bilinear, lanczos or box (an area mean, "
                            "for crops that are only ever shrunk)")
    features_batch: int = _f(64, "records per CLIP encoder call")
    edge: bool = _f(True, "store the Canny edge-map embedding of every image (the control token)")


@dataclass(frozen=True)
class RayConfig:
    """`engine: ray`: Ray Data actor pools per model stage."""

    address: str = _f("", "Ray cluster address (empty: start a local instance)")
    num_cpus: int = _f(0, "CPUs of a local instance (0: all)")
    actors: int = _f(1, "actors per model stage")
    gpus_caption: float = _f(0.0, "GPU share of each caption actor (e.g. 0.5: two actors per GPU)")
    gpus_ground: float = _f(0.0, "GPU share of each ground actor")
    gpus_segment: float = _f(0.0, "GPU share of each segment actor")
    gpus_features: float = _f(0.0, "GPU share of each features actor")


@dataclass(frozen=True)
class BuildConfig:
    """A dataset build: input images -> stage shards -> a feature store, a report and a sample sheet."""

    input: InputConfig = field(default_factory=InputConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    stages: StageConfig = field(default_factory=StageConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    output_dir: str = _f("runs/dataset", "work folder: stages/, features/ (the store), report.md/json, samples.png")
    shard_size: int = _f(1000, "input images per shard (each stage writes one file per shard; the unit of resume)")
    store_shard_size: int = _f(2048, "samples per feature-store shard")
    engine: str = _f("local", "local (in-process) or ray (Ray Data map_batches with actor pools)")
    report_samples: int = _f(8, "records shown in the PNG sample sheet")
    progress: bool = _f(True, "show a progress bar per stage")


def validate_build(config: BuildConfig) -> None:
    s, f = config.stages, config.filter
    checks = [
        (bool(config.input.path), "input.path is empty; set it to a folder of images, .tar shards or .parquet files"),
        (config.shard_size > 0 and config.store_shard_size > 0, "shard_size and store_shard_size must be positive"),
        (config.engine in ("local", "ray"), "engine must be local or ray"),
        (min(s.caption_batch, s.ground_batch, s.segment_batch, s.features_batch) > 0, "stage batch sizes must be positive"),
        (s.crop_resample in RESAMPLE, f"stages.crop_resample must be one of {', '.join(RESAMPLE)}"),
        (0 <= s.box_threshold <= 1 and 0 <= s.text_threshold <= 1, "stages thresholds must be in [0, 1]"),
        (f.box_ratio_measure in ("area", "aspect"), "filter.box_ratio_measure must be area or aspect"),
        (config.models.device in ("auto", "cpu", "cuda") or config.models.device.startswith("cuda:"),
         "models.device must be auto, cpu or cuda"),
        (config.models.dtype in ("auto", "float32", "float16", "bfloat16"), "models.dtype must be auto, float32, float16 or bfloat16"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(f"bad config: {message}")


def load_build_config(path: str | Path | None = None, overrides: list[str] | None = None) -> BuildConfig:
    """Read a YAML build config, apply ``section.key=value`` overrides, validate it."""
    from ..train.config import load_dataclass

    config = load_dataclass(BuildConfig, path, overrides, "build-dataset")
    validate_build(config)
    return config
