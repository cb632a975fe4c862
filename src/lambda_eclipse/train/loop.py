"""The prior trainer: Eq. 1 on interleaved features, resumable to the bit, under `accelerate launch` or plainly.

One optimizer step = ``grad_accum_steps`` micro-batches of ``batch_size`` per rank. The loop is short on purpose:
the math of a step is :func:`~lambda_eclipse.train.step.prior_step_losses`, batching is
:class:`~lambda_eclipse.train.data.ResumableBatchSampler`, and checkpoints are :mod:`~lambda_eclipse.train.checkpoint`.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..prior import LambdaEclipsePrior
from .checkpoint import RunState, export_prior, list_checkpoints, save_checkpoint, saved_config
from .config import TrainConfig, config_to_dict
from .data import ResumableBatchSampler
from .step import prior_step_losses


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") else "no"


def _open_stores(config: TrainConfig):
    from ..features import FeatureDataset, read_zero_image

    if not config.data.train_dir:
        raise UserError("data.train_dir is empty; set it to a feature store, e.g. data.train_dir=runs/debug-features")
    train = FeatureDataset(config.data.train_dir)
    all_indices = list(range(len(train)))
    if config.data.val_dir or config.data.streaming:
        val = FeatureDataset(config.data.val_dir) if config.data.val_dir else None
        val_indices, train_indices = None, all_indices
    else:
        held = min(config.data.val_samples, len(train) // 5)
        val, val_indices, train_indices = train, all_indices[len(train) - held :], all_indices[: len(train) - held]
        val_indices = val_indices or None
    if train.dim != config.model.embedding_dim:
        raise UserError(f"features are {train.dim}-d but model.embedding_dim is {config.model.embedding_dim}; make them match")
    if train.max_text_len > config.model.num_embeddings:
        raise UserError(f"features hold up to {train.max_text_len} tokens but model.num_embeddings is {config.model.num_embeddings}")
    return train, train_indices, val, val_indices, read_zero_image(config.data.train_dir)


def _build_model(config: TrainConfig) -> LambdaEclipsePrior:
    if config.model.init_from:
        return LambdaEclipsePrior.from_pretrained(config.model.init_from)
    kwargs = {k: v for k, v in config_to_dict(config)["model"].items() if k != "init_from"}
    model = LambdaEclipsePrior(**kwargs)
    # GPT-style initialisation: small weights keep the first predictions near the origin (the default Linear init
    # starts with an MSE far above that of predicting zero), and the learned tokens, zero in the released class,
    # start distinct.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.02)
                module.bias.zero_()
        model.positional_embedding.normal_(0, 0.02)
        model.prd_embedding.normal_(0, 0.02)
    return model


@torch.no_grad()
def evaluate(model, loader, zero_image, config: TrainConfig, device, autocast) -> dict[str, float]:
    """Validation: Eq. 1 terms, mean cosine to the target, and retrieval top-1 of the target within each batch."""
    generator = torch.Generator().manual_seed(12345)  # fixed, and separate from the training generator
    totals: dict[str, float] = {}
    batches = 0
    for batch in loader:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with autocast():
            losses, predicted = prior_step_losses(
                model, batch, zero_image, generator, config.loss.lambda_contrastive, config.loss.temperature
            )
        pred = torch.nn.functional.normalize(predicted.float(), dim=-1)
        target = torch.nn.functional.normalize(batch["target"].float(), dim=-1)
        similarity = pred @ target.T
        labels = torch.arange(len(pred), device=pred.device)
        metrics = {k: float(v) for k, v in losses.items()}
        metrics["cosine"] = float(similarity.diagonal().mean())
        metrics["top1"] = float((similarity.argmax(dim=1) == labels).float().mean())
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v
        batches += 1
    return {k: v / max(batches, 1) for k, v in totals.items()}


def train_prior(config: TrainConfig, stop_after: int | None = None) -> Path:
    """Train (or resume) a prior; returns the run folder. ``stop_after`` ends this call after that many steps,
    as an interruption would, leaving the latest checkpoint to resume from."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    out = Path(config.output_dir)
    trackers = None if config.log_with == "none" else config.log_with
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(config.mixed_precision), log_with=trackers, project_dir=str(out / "logs"),
        step_scheduler_with_optimizer=False,
    )
    resolved = config_to_dict(config)
    checkpoints = list_checkpoints(out)
    if checkpoints and saved_config(checkpoints[-1])["model"] != resolved["model"]:
        raise UserError(f"{out} holds a run with another model config; use a new --output-dir")
    train, train_indices, val, val_indices, zero_image = _open_stores(config)

    set_seed(config.seed)
    model = _build_model(config)
    ema = EMAModel(model.parameters(), decay=config.optim.ema_decay) if config.optim.ema_decay else None
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
    )
    schedule = get_scheduler(
        {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[config.optim.schedule],
        optimizer, num_warmup_steps=config.optim.warmup_steps, num_training_steps=config.max_steps,
    )
    state = RunState(generator=torch.Generator().manual_seed(config.seed * 7919 + accelerator.process_index))
    model, optimizer = accelerator.prepare(model, optimizer)
    for item in (schedule, state) + ((ema,) if ema else ()):
        accelerator.register_for_checkpointing(item)
    if checkpoints:
        accelerator.load_state(str(checkpoints[-1]))
        if ema is not None:
            ema.to(accelerator.device)
        accelerator.print(f"resumed from {checkpoints[-1]} at step {state.step}")
    zero_image = zero_image.to(accelerator.device)

    batches = _train_batches(config, train, train_indices, state, accelerator)
    val_loader = _val_loader(config, val, val_indices)
    if trackers and accelerator.is_main_process:
        flat = {f"{s}.{k}": str(v) for s, sec in resolved.items() if isinstance(sec, dict) for k, v in sec.items()}
        accelerator.init_trackers("prior", config=flat)

    unwrapped = accelerator.unwrap_model(model)
    accum = config.optim.grad_accum_steps
    last = min(config.max_steps, state.step + stop_after) if stop_after is not None else config.max_steps
    bar = tqdm(total=config.max_steps, initial=state.step, disable=not (config.progress and accelerator.is_main_process),
               desc="train-prior", dynamic_ncols=True)
    model.train()
    while state.step < last:
        for micro in range(accum):
            batch = next(batches)
            if config.data.streaming:
                state.stream_position = batches.stream.state_dict(after=batch)
            batch = {k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                losses, _ = prior_step_losses(
                    model, batch, zero_image, state.generator, config.loss.lambda_contrastive,
                    config.loss.temperature, config.loss.edge_drop_prob, config.data.subject_drop_prob,
                )
                accelerator.backward(losses["loss"] / accum)
        state.data_position += accum
        if config.optim.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), config.optim.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(unwrapped.parameters())
        state.step += 1
        bar.update(1)
        if state.step % config.log_every == 0 or state.step == last:
            logged = {f"train/{k}": float(v.detach()) for k, v in losses.items()} | {"train/lr": schedule.get_last_lr()[0]}
            bar.set_postfix(loss=f"{logged['train/loss']:.4f}")
            accelerator.log(logged, step=state.step)
        if val_loader is not None and (state.step % config.val_every == 0 or state.step == config.max_steps):
            metrics = _validate(unwrapped, ema, val_loader, zero_image, config, accelerator)
            accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=state.step)
            bar.write(f"step {state.step}: " + " ".join(f"val/{k}={v:.4f}" for k, v in metrics.items()))
            model.train()
        if state.step % config.checkpoint_every == 0 or state.step == last:
            save_checkpoint(accelerator, out, state.step, resolved, config.keep_checkpoints)
    bar.close()
    if state.step >= config.max_steps and accelerator.is_main_process:
        with _ema_weights(unwrapped, ema):
            export_prior(unwrapped, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


class _StreamBatches:
    """Endless iterator over a FeatureStream, epoch after epoch (a fresh DataLoader per epoch, as it requires)."""

    def __init__(self, stream, num_workers: int) -> None:
        self.stream, self.num_workers, self._it = stream, num_workers, None

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._it is None:
                loader = torch.utils.data.DataLoader(self.stream, batch_size=None, num_workers=self.num_workers)
                self._it = iter(loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
                self.stream.set_epoch(self.stream.epoch + 1)


def _train_batches(config: TrainConfig, train, train_indices, state: RunState, accelerator):
    """The endless stream of this rank's training micro-batches, starting at the run state's data position."""
    from ..features import FeatureStream, collate_features

    if config.data.streaming:
        stream = FeatureStream(
            config.data.train_dir, config.data.batch_size, config.data.num_workers, accelerator.process_index,
            accelerator.num_processes, seed=config.seed,
        )
        if state.stream_position is not None:
            stream.load_state_dict(state.stream_position)
        return _StreamBatches(stream, config.data.num_workers)
    sampler = ResumableBatchSampler(
        train_indices, config.data.batch_size, config.seed, accelerator.process_index, accelerator.num_processes,
        start=state.data_position,
    )
    loader = torch.utils.data.DataLoader(
        train, batch_sampler=sampler, num_workers=config.data.num_workers,
        collate_fn=functools.partial(collate_features, max_text_len=config.model.num_embeddings),
        persistent_workers=config.data.num_workers > 0,
    )
    return iter(loader)


def _val_loader(config: TrainConfig, val, val_indices):
    """Validation batches (no shuffling); None when validation is off or there is nothing to validate on."""
    from ..features import collate_features

    if not config.val_every or (val_indices is not None and len(val_indices) < 2):
        return None
    if config.data.streaming and not config.data.val_dir:
        return None  # a stream cannot hold samples out; validation needs data.val_dir
    subset = val if val_indices is None else torch.utils.data.Subset(val, val_indices)
    return torch.utils.data.DataLoader(
        subset, batch_size=min(config.data.batch_size, len(subset)), drop_last=True,
        collate_fn=functools.partial(collate_features, max_text_len=config.model.num_embeddings),
    )


@contextlib.contextmanager
def _ema_weights(model, ema):
    """Temporarily swap the EMA weights in (no-op without EMA)."""
    if ema is None:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())


def _validate(model, ema, loader, zero_image, config, accelerator) -> dict[str, float]:
    model.eval()
    with _ema_weights(model, ema):
        return evaluate(model, loader, zero_image, config, accelerator.device, accelerator.autocast)
