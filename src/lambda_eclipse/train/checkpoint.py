"""Training checkpoints: resume exactly.

A training checkpoint is ``output_dir/checkpoints/step-NNNNNN/``: accelerate's ``save_state`` (model weights in
safetensors; optimizer and RNG states, which accelerate reads back with ``torch.load(weights_only=True)``), the
objects of the run (LR schedule, run state of every rank, EMA) as ``<name>.json`` + ``<name>.safetensors``, and the
resolved config as YAML. It is written under a temporary name and renamed, so a kill leaves either a complete
checkpoint or none.

A run folder is data, never code: nothing in it is unpickled with arbitrary classes. accelerate would keep
registered objects as ``custom_checkpoint_N.pkl`` and load them with full pickle; this module keeps them out of
accelerate, and a checkpoint holding such files (an older version's, or someone else's) is refused.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..atomic import publish_dir
from ..errors import UserError

CHECKPOINT = re.compile(r"^step-(\d{6,})$")


@dataclass
class RunState:
    """What changes as a run goes: the optimizer step, the data position and the trainer's CPU generator.

    ``data_position`` counts global micro-batches consumed (see :class:`~lambda_eclipse.train.data.ResumableBatchSampler`);
    with a streaming reader, ``stream_position`` is the stream's own position after the last batch consumed.
    Every random draw of an objective goes through ``generator``, so a resumed run draws what an uninterrupted
    one would have.
    """

    step: int = 0
    data_position: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)
    stream_position: dict[str, int] | None = None  # FeatureStream.state_dict() when streaming

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "data_position": self.data_position, "generator": self.generator.get_state(),
                "stream_position": self.stream_position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.data_position = int(state["step"]), int(state["data_position"])
        self.generator.set_state(state["generator"])
        self.stream_position = state.get("stream_position")


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator, output_dir: Path, step: int, config_dict: dict[str, Any], keep: int,
                    objects: Mapping[str, Any] | None = None,
                    rank_objects: Mapping[str, Any] | None = None) -> Path | None:
    """Save a training checkpoint atomically and prune all but the newest ``keep``. Returns its path (main rank).

    ``objects`` (schedule, EMA: the same on every rank) are written by the main rank, ``rank_objects`` (the run
    state, whose generator differs per rank) by every rank as ``<name>_<rank>``; see :func:`write_state`.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"step-{step:06d}"
    # Every rank writes its own RNG state into the same folder, so the folder's name must be known to all of them:
    # a fixed staging name, cleared by the main rank first.
    staging = root / f".staging-step-{step:06d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=True)
    for name, obj in (rank_objects or {}).items():
        write_state(staging / f"{name}_{accelerator.process_index}", obj.state_dict())
    if accelerator.is_main_process:
        for name, obj in (objects or {}).items():
            write_state(staging / name, obj.state_dict())
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    (staging / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
    publish_dir(staging, final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def saved_config(checkpoint: Path) -> dict[str, Any]:
    """The resolved config a checkpoint was written with (YAML, read with ``safe_load``: data only)."""
    try:
        saved = yaml.safe_load((checkpoint / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"checkpoint {checkpoint} has no readable config.yaml ({type(error).__name__}); it is not a "
                        "lambda-eclipse checkpoint: use another output folder") from None
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint {checkpoint}: config.yaml is not a mapping; use another output folder")
    return saved


def load_checkpoint(accelerator, checkpoint: Path, objects: Mapping[str, Any], rank_objects: Mapping[str, Any]) -> None:
    """Restore what :func:`save_checkpoint` wrote, refusing anything that would need full unpickling.

    Raises:
        UserError: the checkpoint holds pickled objects (``*.pkl`` other than accelerate's RNG states, which it
            reads with ``weights_only=True``), a file that is not plain tensors, or lacks a state file.
    """
    refuse_pickled_objects(checkpoint)
    try:
        accelerator.load_state(str(checkpoint))
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "not plain tensors"
        raise UserError(f"checkpoint {checkpoint} holds a file that is not plain tensors ({first[:120]}); a run folder "
                        "is data, not code: resume only runs you made, or start a new output folder") from None
    for name, obj in objects.items():
        obj.load_state_dict(read_state(checkpoint / name))
    for name, obj in rank_objects.items():
        obj.load_state_dict(read_state(checkpoint / f"{name}_{accelerator.process_index}"))


def refuse_pickled_objects(checkpoint: Path) -> None:
    """Refuse a checkpoint holding ``custom_checkpoint_*.pkl``: accelerate unpickles those with any class allowed."""
    pickled = sorted(p.name for p in Path(checkpoint).glob("custom_checkpoint_*.pkl"))
    if pickled:
        raise UserError(f"checkpoint {checkpoint} keeps run state as pickle ({', '.join(pickled)}), which this version "
                        "never loads (it could run code); start a new output folder, or resume it with the version "
                        "that wrote it")


def write_state(stem: Path, state: Any) -> None:
    """Write a ``state_dict`` as ``<stem>.safetensors`` (its tensors) + ``<stem>.json`` (the rest, tensors as
    ``{"__tensor__": key}``): run state that loading can never turn into code."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    plain = _split(state, tensors)
    save_file(tensors, str(stem.with_name(stem.name + ".safetensors")))
    stem.with_name(stem.name + ".json").write_text(json.dumps(plain))


def read_state(stem: Path) -> Any:
    """The ``state_dict`` :func:`write_state` wrote at ``stem``."""
    from safetensors.torch import load_file

    files = [stem.with_name(stem.name + suffix) for suffix in (".json", ".safetensors")]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"checkpoint {stem.parent} lacks {', '.join(missing)}; it is incomplete or from another "
                        "version: start a new output folder")
    try:
        return _join(json.loads(files[0].read_text()), load_file(str(files[1])))
    except (ValueError, OSError, KeyError) as error:
        raise UserError(f"checkpoint file {files[0].parent / stem.name}.* is damaged ({error}); resume from an "
                        "earlier checkpoint (delete this one) or start a new output folder") from None


def _split(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().to("cpu").clone().contiguous()  # clone: safetensors refuses shared storage
        return {"__tensor__": key}
    if isinstance(value, Mapping):
        items = [[_split(k, tensors), _split(v, tensors)] for k, v in value.items()]
        return {"__items__": items}  # keys keep their type (an optimizer state is keyed by int)
    if isinstance(value, (list, tuple)):
        return {"__tuple__" if isinstance(value, tuple) else "__list__": [_split(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"run state holds a {type(value).__name__}; only tensors, numbers, strings and containers are saved")


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__items__" in value:
            return {_join(k, tensors): _join(v, tensors) for k, v in value["__items__"]}
        if "__tuple__" in value:
            return tuple(_join(v, tensors) for v in value["__tuple__"])
        return [_join(v, tensors) for v in value["__list__"]]
    return value
