"""Shared machinery of the miniature-model recipes: atomic writes, resumable checkpoints, schedules.

Every recipe is a plain PyTorch loop whose randomness at step ``k`` is a function of ``(seed, k)``
alone (:func:`step_generator`), so a run killed and resumed from its last checkpoint draws the same
batches it would have drawn without the interruption.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads for torch ops (1 keeps a background build from crowding the machine)."""
    torch.set_num_threads(max(1, int(threads)))


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; on success it replaces ``final`` in one rename.

    A reader therefore sees either the old complete folder, or the new complete one, never half of one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    """The checkpoint at ``path``, or None when there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


class Checkpointer:
    """Decides when a loop saves: every ``every`` steps or ``seconds`` seconds, and at the last step."""

    def __init__(self, path: Path, total: int, every: int = 500, seconds: float = 120.0) -> None:
        self.path, self.total, self.every, self.seconds = Path(path), total, every, seconds
        self._last = time.monotonic()

    def maybe_save(self, step: int, state_fn, force: bool = False) -> bool:
        """``step`` is the number of finished steps; ``state_fn()`` builds the state dict only when saving."""
        due = force or step == self.total or step % self.every == 0 or time.monotonic() - self._last > self.seconds
        if due:
            atomic_save({"step": step, **state_fn()}, self.path)
            self._last = time.monotonic()
        return due


def optimizer_step(
    loss: torch.Tensor, model: torch.nn.Module | tuple[torch.nn.Module, ...], optimizer: torch.optim.Optimizer
) -> None:
    """Backward, clip the gradient norm (of all of ``model``'s modules together) to 1 and step: the update every
    recipe makes."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    modules = model if isinstance(model, tuple) else (model,)
    torch.nn.utils.clip_grad_norm_([p for m in modules for p in m.parameters()], 1.0)
    optimizer.step()


def finish_step(step: int, loss: torch.Tensor, bar: tqdm, ckpt: "Checkpointer", state_fn, stop_at: int | None,
                digits: int = 4) -> bool:
    """Report the loss, checkpoint when due (always when stopping early); returns whether to stop now."""
    bar.update(1)
    bar.set_postfix(loss=f"{loss.item():.{digits}f}", refresh=False)
    stopping = stop_at is not None and step + 1 >= stop_at
    ckpt.maybe_save(step + 1, state_fn, force=stopping)
    return stopping


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A torch RNG for step ``step`` of stream ``stream``, independent of how the run was interrupted."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) * 10_000_019 + step)


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to ``peak``, then cosine decay to ``floor × peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def progress(total: int, initial: int, desc: str) -> tqdm:
    """A tqdm bar; when the output is a log file rather than a terminal it updates every 30 s."""
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total, initial=initial, desc=desc, mininterval=0.5 if interactive else 30.0, dynamic_ncols=interactive
    )


class EMA:
    """Exponential moving average of a model's parameters (float32), with the usual warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # early on the average would be dominated by the random init; (1+k)/(10+k) ramps the decay up
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}
