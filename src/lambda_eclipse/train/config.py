"""Prior-training configuration: frozen dataclasses filled from YAML and dotted command-line overrides.

Each field carries its help text in ``metadata["help"]``; `lambda-eclipse train-prior --help-config` prints them.
A config is never mutated at run time; the step, RNG and data position live in the trainer's run state.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..losses import DEFAULT_LAMBDA, DEFAULT_TEMPERATURE


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DataConfig:
    """Where the features come from and how they are batched."""

    train_dir: str = _f("", "feature store folder to train on (written by the dataset builder or `features synth`)")
    val_dir: str = _f("", "feature store to validate on; empty: hold out `val_samples` of train_dir (map-style only)")
    val_samples: int = _f(256, "samples held out of train_dir for validation when val_dir is empty")
    batch_size: int = _f(512, "samples per GPU per micro-batch (paper: 512 on each of 2 GPUs)")
    num_workers: int = _f(2, "DataLoader worker processes per rank")
    streaming: bool = _f(False, "read shards as a shuffled stream (FeatureStream; use at scale) instead of random access")
    subject_drop_prob: float = _f(0.0, "probability of leaving a subject's word as text (trains text-only use too)")


@dataclass(frozen=True)
class ModelConfig:
    """The prior's architecture (paper appendix C); embedding_dim must match the features."""

    num_attention_heads: int = _f(16, "attention heads")
    attention_head_dim: int = _f(32, "width of each head")
    num_layers: int = _f(10, "transformer blocks")
    embedding_dim: int = _f(1280, "CLIP embedding width (1280 for ViT-bigG/14)")
    num_embeddings: int = _f(77, "text positions (the text encoder's context length)")
    additional_embeddings: int = _f(4, "extra tokens: 4 = control + text + noise + read-out (λ), 3 = no control")
    dropout: float = _f(0.0, "dropout in attention and feed-forward")
    init_from: str = _f("", "optional prior folder or Hub id to start from (e.g. the released ECLIPSE prior)")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then decay (the training core's optimizer settings, for every objective)."""

    lr: float = _f(5e-5, "peak learning rate (paper: 5e-5)")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas")
    eps: float = _f(1e-8, "AdamW epsilon")
    warmup_steps: int = _f(1000, "linear warm-up steps")
    schedule: str = _f("cosine", "decay after warm-up: cosine, linear or constant")
    min_lr_ratio: float = _f(0.0, "cosine only: the learning rate it decays to, as a share of lr")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step")
    ema_decay: float = _f(0.0, "EMA decay of the weights (0 disables EMA); the exported prior uses the EMA weights")


@dataclass(frozen=True)
class LossConfig:
    """Eq. 1: projection MSE + λ · contrastive."""

    lambda_contrastive: float = _f(DEFAULT_LAMBDA, "λ, weight of the contrastive term (paper: 0.2)")
    temperature: float = _f(DEFAULT_TEMPERATURE, "τ of the contrastive term (see lambda_eclipse.losses for the choice)")
    edge_drop_prob: float = _f(0.01, "probability of replacing the edge embedding by the zero-image embedding (§3.1)")


@dataclass(frozen=True)
class TrainConfig:
    """A prior-training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    output_dir: str = _f("runs/prior", "run folder: checkpoints/, logs/ and the exported prior/")
    max_steps: int = _f(100_000, "optimizer steps of the whole run (paper: ~100K)")
    checkpoint_every: int = _f(1000, "steps between training checkpoints")
    keep_checkpoints: int = _f(3, "training checkpoints kept (the oldest are deleted)")
    val_every: int = _f(1000, "steps between validations (0 disables)")
    log_every: int = _f(50, "steps between logged training losses")
    seed: int = _f(0, "seed of initialisation, data order, noise tokens and edge/subject dropping")
    mixed_precision: str = _f("auto", "no, bf16, fp16, or auto (bf16 where the device supports it, else no)")
    log_with: str = _f("tensorboard", "tensorboard, wandb, or none")
    progress: bool = _f(True, "show a progress bar")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "loss": LossConfig}


def _coerce(value: Any, kind: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if origin is tuple:
            items = yaml.safe_load(value) if isinstance(value, str) else value
            return tuple(float(v) for v in items)
        if kind in (int, float, str):
            if isinstance(value, str) and kind is not str:
                value = yaml.safe_load(value)
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return kind(value)
    except (TypeError, ValueError, yaml.YAMLError):
        raise UserError(f"config key {key!r} needs a {getattr(kind, '__name__', kind)}, got {value!r}") from None
    return value


def _build(cls, values: dict[str, Any], prefix: str = "", command: str = "train-prior") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        name = prefix + sorted(unknown)[0]
        raise UserError(f"unknown config key {name!r}; see `lambda-eclipse {command} --help-config`")
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        value, kind = values[f.name], hints[f.name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise UserError(f"config section {prefix + f.name!r} must be a mapping")
            kwargs[f.name] = _build(kind, value, prefix + f.name + ".", command)
        else:
            kwargs[f.name] = _coerce(value, kind, prefix + f.name)
    return cls(**kwargs)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **top: Any) -> TrainConfig:
    """Read a YAML config, apply ``key.sub=value`` overrides and keyword overrides, and validate it."""
    values = read_values(path, overrides)
    for key, value in top.items():
        if value is not None:
            values[key] = value
    config = _build(TrainConfig, values)
    validate(config)
    return config


def read_values(path: str | Path | None, overrides: list[str] | None) -> dict[str, Any]:
    """A YAML file's mapping with ``section.key=value`` overrides applied (values still raw; see ``_build``)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {str(path)!r} does not exist; give a YAML file such as configs/prior-debug.yaml")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise UserError(f"config file {str(path)!r} is not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise UserError(f"config file {str(path)!r} must hold a mapping of keys")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"malformed override {item!r}; write it as section.key=value, e.g. optim.lr=1e-4")
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} goes through a non-section key")
        node[leaf] = raw
    return values


def validate(config: TrainConfig) -> None:
    checks = [
        (config.max_steps > 0, "max_steps must be positive"),
        (config.checkpoint_every > 0, "checkpoint_every must be positive"),
        (config.keep_checkpoints > 0, "keep_checkpoints must be positive"),
        (config.data.batch_size > 1, "data.batch_size must be at least 2 (the contrastive term needs negatives)"),
        (config.optim.grad_accum_steps > 0, "optim.grad_accum_steps must be positive"),
        (config.optim.lr > 0, "optim.lr must be positive"),
        (config.optim.schedule in ("cosine", "linear", "constant"), "optim.schedule must be cosine, linear or constant"),
        (0 <= config.optim.min_lr_ratio < 1, "optim.min_lr_ratio must be in [0, 1)"),
        (config.loss.temperature > 0, "loss.temperature must be positive"),
        (0 <= config.loss.edge_drop_prob <= 1, "loss.edge_drop_prob must be in [0, 1]"),
        (0 <= config.data.subject_drop_prob <= 1, "data.subject_drop_prob must be in [0, 1]"),
        (0 <= config.optim.ema_decay < 1, "optim.ema_decay must be in [0, 1)"),
        (config.mixed_precision in ("auto", "no", "bf16", "fp16"), "mixed_precision must be auto, no, bf16 or fp16"),
        (config.log_with in ("tensorboard", "wandb", "none"), "log_with must be tensorboard, wandb or none"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(f"bad config: {message}")


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_help(root: type = TrainConfig) -> str:
    """One line per key of the dataclass ``root``: dotted name, default, help."""
    lines = []

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], prefix + f.name + ".")
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                lines.append(f"  {prefix + f.name:<28} {default!s:<14} {f.metadata.get('help', '')}")

    walk(root)
    return "\n".join(lines)
