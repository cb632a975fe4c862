"""Training checkpoints: resume exactly.

A training checkpoint is ``output_dir/checkpoints/step-NNNNNN/``: accelerate's ``save_state`` (model, optimizer,
RNG states of every rank, and the registered objects: LR schedule, run state, EMA) plus the resolved config. It is
written under a temporary name and renamed, so a kill leaves either a complete checkpoint or none.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..atomic import publish_dir

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


def save_checkpoint(accelerator, output_dir: Path, step: int, config_dict: dict[str, Any], keep: int) -> Path | None:
    """Save a training checkpoint atomically and prune all but the newest ``keep``. Returns its path (main rank)."""
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
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    (staging / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
    publish_dir(staging, final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def saved_config(checkpoint: Path) -> dict[str, Any]:
    return yaml.safe_load((checkpoint / "config.yaml").read_text())
