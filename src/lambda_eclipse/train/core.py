"""The one training core: every model of the project trains through :func:`run_training`.

The core owns the machinery — accelerate (devices, mixed precision, DDP, gradient accumulation), AdamW, the
learning-rate schedule (diffusers ``get_scheduler``), EMA (diffusers ``EMAModel``), the run state, checkpoints,
exact resume, logging and the progress bar. What is trained, on what and for which loss is an
:class:`Objective`: the prior (Eq. 1, :mod:`.prior`), the decoder UNet (Eq. 2, :mod:`.decoder`) and the miniature
world's component recipes are objectives.

One optimizer step = ``grad_accum_steps`` micro-batches. All of an objective's random draws go through
``state.generator`` (a CPU generator saved in every checkpoint), so a run killed at any moment and rerun with the
same output folder ends bitwise-equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..checks import NonFiniteError
from ..errors import UserError
from .checkpoint import RunState, list_checkpoints, load_checkpoint, save_checkpoint, saved_config
from .config import OptimConfig


@dataclass(frozen=True)
class LoopSettings:
    """How a run is driven, whatever its objective (the prior's are the top-level keys of its config)."""

    output_dir: str
    max_steps: int
    optim: OptimConfig
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    val_every: int = 0
    log_every: int = 50
    seed: int = 0
    mixed_precision: str = "no"
    log_with: str = "none"
    progress: bool = True
    name: str = "train"  # progress-bar label and tracker project name


class Objective(Protocol):
    """What a run optimises. The core calls these in this order: ``build_model``, ``batches``, then per
    micro-batch ``losses``; ``validate`` every ``val_every`` steps and ``export`` once at the end (both under the
    EMA weights when EMA is on)."""

    def config_dict(self) -> dict[str, Any]:
        """The resolved configuration, saved in every checkpoint."""

    def check_resume(self, saved: dict[str, Any], output_dir: Path) -> None:
        """Raise :class:`UserError` if a checkpoint with config ``saved`` cannot be resumed by this objective."""

    def build_model(self) -> torch.nn.Module:
        """The module whose parameters are trained (several modules: wrap them in a ``ModuleDict``)."""

    def batches(self, state: RunState, accelerator) -> Iterator[Any]:
        """The endless stream of this rank's micro-batches, starting where ``state`` says the run is."""

    def losses(self, model: torch.nn.Module, batch: Any, state: RunState) -> dict[str, torch.Tensor]:
        """Named scalar losses of one micro-batch; ``"loss"`` is the one backpropagated."""

    def validate(self, model: torch.nn.Module, accelerator) -> dict[str, float] | None:
        """Validation metrics, or None when the objective has no validation."""

    def export(self, model: torch.nn.Module, output_dir: Path) -> None:
        """Write the trained model in its release format (main rank only)."""


@dataclass
class TrainingRun:
    """What :func:`run_training` returns: the run folder, the trained model (EMA weights, when EMA is on, once
    the run is complete) and the step it reached."""

    output_dir: Path
    model: torch.nn.Module
    step: int
    complete: bool


def resolve_mixed_precision(choice: str) -> str:
    """"auto" -> bf16 where the device runs it fast (CUDA with bf16, AVX512/AMX CPUs), fp16 on older CUDA, else no."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") else "no"


def make_schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int):
    """Linear warm-up, then ``optim.schedule`` (cosine, linear or constant); cosine ends at
    ``optim.min_lr_ratio`` × the peak learning rate."""
    from diffusers.optimization import get_scheduler

    if optim.schedule == "cosine" and optim.min_lr_ratio > 0:
        # diffusers' cosine decays to 0; transformers has the same curve with a floor
        from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, optim.warmup_steps, max_steps, min_lr_rate=optim.min_lr_ratio)
    kind = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[optim.schedule]
    return get_scheduler(kind, optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=max_steps)


@contextlib.contextmanager
def ema_weights(model: torch.nn.Module, ema) -> Iterator[None]:
    """Temporarily swap the EMA weights into ``model`` (no-op without EMA)."""
    if ema is None:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())


def _progress_bar(settings: LoopSettings, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    # in a log file (a background build) one line every 30 s instead of one per redraw
    return tqdm(total=settings.max_steps, initial=initial, desc=settings.name, disable=not enabled,
                mininterval=0.5 if interactive else 30.0, dynamic_ncols=interactive)


def run_training(objective: Objective, settings: LoopSettings, stop_after: int | None = None) -> TrainingRun:
    """Train (or resume) ``objective`` into ``settings.output_dir``.

    ``stop_after`` ends this call after that many steps, as an interruption would, leaving the latest checkpoint
    to resume from (a checkpoint is always written at the last step of a call).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.training_utils import EMAModel

    out = Path(settings.output_dir)
    optim = settings.optim
    trackers = None if settings.log_with == "none" else settings.log_with
    _forget_previous_run_settings()
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(settings.mixed_precision), log_with=trackers,
        project_dir=str(out / "logs"), step_scheduler_with_optimizer=False,
    )
    resolved = objective.config_dict()
    checkpoints = list_checkpoints(out)
    if checkpoints:
        objective.check_resume(saved_config(checkpoints[-1]), out)

    set_seed(settings.seed)
    model = objective.build_model()
    ema = EMAModel(model.parameters(), decay=optim.ema_decay) if optim.ema_decay else None
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=optim.lr, betas=optim.betas, eps=optim.eps,
        weight_decay=optim.weight_decay,
    )
    schedule = make_schedule(optimizer, optim, settings.max_steps)
    state = RunState(generator=torch.Generator().manual_seed(settings.seed * 7919 + accelerator.process_index))
    model, optimizer = accelerator.prepare(model, optimizer)
    # Kept out of accelerate's register_for_checkpointing, which pickles them: safetensors + JSON instead.
    shared = {"schedule": schedule, **({"ema": ema} if ema else {})}
    per_rank = {"run_state": state}
    if checkpoints:
        load_checkpoint(accelerator, checkpoints[-1], shared, per_rank)
        if ema is not None:
            ema.to(accelerator.device)
        accelerator.print(f"{settings.name}: resumed from {checkpoints[-1]} at step {state.step}")
    unwrapped = accelerator.unwrap_model(model)
    if trackers and accelerator.is_main_process:
        flat = {f"{s}.{k}": str(v) for s, sec in resolved.items() if isinstance(sec, dict) for k, v in sec.items()}
        accelerator.init_trackers(settings.name, config=flat)

    batches = objective.batches(state, accelerator)
    accum = optim.grad_accum_steps
    last = min(settings.max_steps, state.step + stop_after) if stop_after is not None else settings.max_steps
    bar = _progress_bar(settings, state.step, settings.progress and accelerator.is_main_process)
    model.train()
    while state.step < last:
        for micro in range(accum):
            batch = next(batches)
            # DDP syncs gradients only on the last micro-batch of a step
            sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                losses = objective.losses(model, batch, state)
                accelerator.backward(losses["loss"] / accum)
            finite = torch.isfinite(losses["loss"].detach())  # stays on the device: no sync per micro-batch
            bad = ~finite if micro == 0 else bad | ~finite
        if bool(bad):  # one sync per step; stops before a NaN reaches the weights, a checkpoint or the export
            terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            raise NonFiniteError(f"{settings.name}: the loss is not finite at step {state.step + 1} ({terms}); lower "
                                 "optim.lr or check the data (`lambda-eclipse features validate`); nothing of this "
                                 "step was saved")
        state.data_position += accum
        if optim.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(unwrapped.parameters())
        state.step += 1
        bar.update(1)
        if state.step % settings.log_every == 0 or state.step == last:
            logged = {f"train/{k}": float(v.detach()) for k, v in losses.items()} | {"train/lr": schedule.get_last_lr()[0]}
            bar.set_postfix(loss=f"{logged['train/loss']:.4f}", refresh=False)
            accelerator.log(logged, step=state.step)
        if settings.val_every and (state.step % settings.val_every == 0 or state.step == settings.max_steps):
            model.eval()
            with ema_weights(unwrapped, ema), torch.no_grad():
                metrics = objective.validate(unwrapped, accelerator)
            if metrics:
                accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=state.step)
                bar.write(f"step {state.step}: " + " ".join(f"val/{k}={v:.4f}" for k, v in metrics.items()))
            model.train()
        if state.step % settings.checkpoint_every == 0 or state.step == last:
            save_checkpoint(accelerator, out, state.step, resolved, settings.keep_checkpoints, shared, per_rank)
    bar.close()
    complete = state.step >= settings.max_steps
    model.eval()
    if complete:
        if accelerator.is_main_process:
            with ema_weights(unwrapped, ema):
                objective.export(unwrapped, out)
        if ema is not None:
            ema.copy_to(unwrapped.parameters())  # what the caller gets back is what was exported
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainingRun(out, unwrapped, state.step, complete)


def _forget_previous_run_settings() -> None:
    """Let one process run several trainings with different mixed precision (the miniature build does).

    accelerate keeps one process-wide ``AcceleratorState`` and refuses a second Accelerator with other settings;
    its per-run part is cleared here. The ``PartialState`` (process group, device, rank) is kept, so this is safe
    under ``accelerate launch`` too.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def require_same(saved: dict[str, Any], resolved: dict[str, Any], keys: tuple[str, ...], output_dir: Path) -> None:
    """For :meth:`Objective.check_resume`: refuse to resume when any of ``keys`` differs from the saved config."""
    import json

    plain = lambda value: json.loads(json.dumps(value))  # noqa: E731  (tuples saved as YAML lists compare equal)
    for key in keys:
        if plain(saved.get(key)) != plain(resolved.get(key)):
            raise UserError(f"{output_dir} holds a run with another {key} config; use a new output folder")
