"""How every miniature-world recipe is driven by the training core: one place for what they share."""

from __future__ import annotations

import os

from ..train.config import OptimConfig
from ..train.core import LoopSettings


def recipe_settings(
    name: str, work_dir: str | os.PathLike, steps: int, seed: int, lr: float, warmup: int, weight_decay: float = 0.0,
    max_grad_norm: float = 1.0, ema_decay: float = 0.0, mixed_precision: str = "no", checkpoint_every: int = 500,
) -> LoopSettings:
    """AdamW, linear warm-up then cosine to 10% of the peak, one kept checkpoint every ``checkpoint_every`` steps
    in ``work_dir`` (a rerun resumes from it), no tracker."""
    optim = OptimConfig(lr=lr, weight_decay=weight_decay, warmup_steps=warmup, schedule="cosine", min_lr_ratio=0.1,
                        max_grad_norm=max_grad_norm, ema_decay=ema_decay)
    return LoopSettings(output_dir=str(work_dir), max_steps=steps, optim=optim, checkpoint_every=checkpoint_every,
                        keep_checkpoints=1, seed=seed, mixed_precision=mixed_precision, name=name)
