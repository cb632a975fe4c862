"""Shared benchmark helpers: timing and realistic prior inputs."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def caption_lengths(batch: int, generator: torch.Generator, mean: float = 16.0, max_len: int = 77) -> torch.Tensor:
    """Token lengths (BOS and EOS included) like BLIP-2 captions: mean ~16, a few long tails, within 4..max_len."""
    # Sum of 8 exponentials = Gamma(8, mean/8), drawn from the generator so runs repeat.
    uniform = torch.rand(batch, 8, generator=generator).clamp_min(1e-12)
    lengths = -(mean / 8.0) * uniform.log().sum(dim=1)
    return lengths.round().clamp(4, max_len).long()


def prior_inputs(batch: int, dim: int = 1280, text_len: int = 77, seed: int = 0, device="cpu", mean_len=16.0):
    """Random prior inputs at full text length (77) with a mask of realistic caption lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = caption_lengths(batch, g, mean_len, text_len)
    mask = torch.arange(text_len)[None] < lengths[:, None]
    x = dict(
        hidden_states=torch.randn(batch, dim, generator=g), proj_embedding=torch.randn(batch, dim, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, dim, generator=g), attention_mask=mask,
        control_embedding=torch.randn(batch, dim, generator=g),
    )
    return {k: v.to(device) for k, v in x.items()}


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], None] = lambda: None) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
