"""One prior training step's math: a feature batch -> interleaved prior inputs -> Eq. 1 loss terms.

The binding goes through :func:`lambda_eclipse.conditioning.bind_subjects`, the same function the generation
pipeline uses, so what the prior sees in training is exactly what it sees at inference.
"""

from __future__ import annotations

import torch

from ..conditioning import bind_subjects
from ..losses import prior_loss


def interleaved_prior_inputs(
    batch: dict[str, torch.Tensor],
    zero_image: torch.Tensor,
    generator: torch.Generator,
    edge_drop_prob: float = 0.0,
    subject_drop_prob: float = 0.0,
    with_control: bool = True,
) -> dict[str, torch.Tensor]:
    """Prior keyword arguments for a collated feature batch.

    Args:
        batch: ``collate_features`` output — token_states (B, L, D), attention_mask (B, L), pooled_text (B, D),
            token_subject (B, L), subject_embeds (B, S, D), subject_mask (B, S), edge (B, D), has_edge (B,).
        zero_image: (D,) or (1, D) zero-image embedding: the control input when a sample has no edge map or drops it.
        generator: CPU generator for the noise token and the drop decisions (its state is checkpointed).
        edge_drop_prob: probability of replacing an edge embedding by the zero-image embedding (paper: 1%).
        subject_drop_prob: probability of leaving a subject's word as plain text (every occurrence of it).

    Returns:
        hidden_states (B, D) noise, proj_embedding, encoder_hidden_states, attention_mask, control_embedding.
    """
    states = batch["token_states"]
    b, _, dim = states.shape
    device = states.device
    subject_mask = batch["subject_mask"].bool()
    # Draw every random number on the CPU generator, always in the same order, so runs repeat on any device.
    noise = torch.randn(b, dim, generator=generator).to(device, states.dtype)
    keep_subject = torch.rand(subject_mask.shape, generator=generator) >= subject_drop_prob
    keep_edge = torch.rand(b, generator=generator) >= edge_drop_prob
    keep = subject_mask & keep_subject.to(device)  # (B, S)
    index = batch["token_subject"].to(device, torch.long)  # (B, L), -1 = text
    # A dropped subject loses all its tokens at once: unbind every token whose owner is not kept.
    kept = torch.gather(keep, 1, index.clamp(min=0)) & (index >= 0)
    bound = bind_subjects(states, batch["subject_embeds"], torch.where(kept, index, -1))
    inputs = dict(
        hidden_states=noise,
        proj_embedding=batch["pooled_text"],
        encoder_hidden_states=bound,
        attention_mask=batch["attention_mask"],
        control_embedding=None,
    )
    if with_control:
        use_edge = batch["has_edge"].bool() & keep_edge.to(device)
        zero = zero_image.reshape(1, dim).to(device, batch["edge"].dtype)
        inputs["control_embedding"] = torch.where(use_edge[:, None], batch["edge"], zero)
    return inputs


def prior_step_losses(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    zero_image: torch.Tensor,
    generator: torch.Generator,
    lambda_contrastive: float,
    temperature: float,
    edge_drop_prob: float = 0.0,
    subject_drop_prob: float = 0.0,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Forward the prior on a batch and return (named Eq. 1 loss terms, (B, D) predictions)."""
    prior = getattr(model, "module", model)  # unwrapped under DDP
    inputs = interleaved_prior_inputs(
        batch, zero_image, generator, edge_drop_prob, subject_drop_prob, with_control=prior.has_control
    )
    predicted = model(**inputs).predicted_image_embedding
    losses = prior_loss(
        predicted.float(), batch["target"].float(), batch["pooled_text"].float(),
        lambda_contrastive=lambda_contrastive, temperature=temperature,
    )
    return losses, predicted
