"""The prior objective: Eq. 1 on interleaved features, run by the training core (:mod:`.core`).

The math of a step is :func:`~lambda_eclipse.train.step.prior_step_losses` (the same λ binding as inference),
batching is :class:`~lambda_eclipse.train.data.ResumableBatchSampler` or a :class:`~lambda_eclipse.features.FeatureStream`,
and the exported ``prior/`` is in the released checkpoint's format.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_dir
from ..errors import UserError
from ..prior import LambdaEclipsePrior
from .checkpoint import RunState
from .config import TrainConfig, config_to_dict
from .core import LoopSettings, require_same, run_training
from .data import ResumableBatchSampler
from .step import prior_step_losses


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




class PriorObjective:
    """Eq. 1 for :func:`~lambda_eclipse.train.core.run_training`; see :class:`~lambda_eclipse.train.core.Objective`."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.train, self.train_indices, self.val, self.val_indices, self.zero_image = _open_stores(config)
        self._val_loader = _val_loader(config, self.val, self.val_indices)

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.config)

    def check_resume(self, saved: dict[str, Any], output_dir: Path) -> None:
        require_same(saved, self.config_dict(), ("model",), output_dir)

    def build_model(self) -> LambdaEclipsePrior:
        return _build_model(self.config)

    def batches(self, state: RunState, accelerator):
        device = accelerator.device
        self.zero_image = self.zero_image.to(device)
        stream = _train_batches(self.config, self.train, self.train_indices, state, accelerator)
        for batch in stream:
            if self.config.data.streaming:
                state.stream_position = stream.stream.state_dict(after=batch)
            yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def losses(self, model, batch, state: RunState) -> dict[str, torch.Tensor]:
        c = self.config
        losses, _ = prior_step_losses(model, batch, self.zero_image, state.generator, c.loss.lambda_contrastive,
                                      c.loss.temperature, c.loss.edge_drop_prob, c.data.subject_drop_prob)
        return losses

    def validate(self, model, accelerator) -> dict[str, float] | None:
        if self._val_loader is None:
            return None
        return evaluate(model, self._val_loader, self.zero_image, self.config, accelerator.device, accelerator.autocast)

    def export(self, model, output_dir: Path) -> None:
        """``prior/``: ``config.json`` + ``diffusion_pytorch_model.safetensors``, the released checkpoint's format."""
        with atomic_dir(Path(output_dir) / "prior") as temporary:
            model.save_pretrained(temporary, safe_serialization=True)


def loop_settings(config: TrainConfig) -> LoopSettings:
    """The training core's settings of a prior run (the config's top-level keys)."""
    return LoopSettings(
        output_dir=config.output_dir, max_steps=config.max_steps, optim=config.optim,
        checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints, val_every=config.val_every,
        log_every=config.log_every, seed=config.seed, mixed_precision=config.mixed_precision,
        log_with=config.log_with, progress=config.progress, name="train-prior",
    )


def train_prior(config: TrainConfig, stop_after: int | None = None) -> Path:
    """Train (or resume) a prior; returns the run folder (the exported prior is its ``prior/``). ``stop_after``
    ends this call after that many steps, as an interruption would, leaving the latest checkpoint to resume from."""
    return run_training(PriorObjective(config), loop_settings(config), stop_after).output_dir


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
