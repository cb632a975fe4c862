"""Every loss of the project: Eq. 1 (the prior), Eq. 2 (the decoder UNet) and CLIP's contrastive loss.

Eq. 1 of the paper: projection MSE + λ · contrastive (image → text InfoNCE), with negatives across ranks.

.. math::

    \\mathcal{L}_{prior} = \\lVert z_x - \\hat z_x \\rVert^2
        - \\frac{\\lambda}{N} \\sum_i \\log \\frac{\\exp(\\langle \\hat z_x^i, z_y^i \\rangle / \\tau)}
                                            {\\sum_j \\exp(\\langle \\hat z_x^i, z_y^j \\rangle / \\tau)}

Choices (the paper and ECLIPSE (Patel et al. 2023) give the formula but no training code was released):

- **MSE** is averaged over batch *and* feature dimension (``F.mse_loss``), the convention of diffusers'
  prior-training script that the ECLIPSE prior (a diffusers ``PriorTransformer``) descends from. Summing over D
  instead would scale it by D = 1280 and change what λ = 0.2 means.
- **Contrastive** is one-directional, as Eq. 1 is written: each *predicted image embedding* (row i) must pick its
  own caption's pooled text embedding (column i) among the batch's text embeddings. ⟨·,·⟩ is the inner product of
  **L2-normalised** embeddings (cosine similarity), as in CLIP, whose space the prior predicts into: unnormalised
  inner products would let the loss be lowered by inflating the norm of the prediction, fighting the MSE term.
- **τ defaults to 0.01**, i.e. CLIP's own logit scale (OpenCLIP ViT-bigG/14's learned ``logit_scale`` is
  ln 100). At the CLIP temperature the ground-truth image embedding — the MSE optimum — already ranks its
  caption first by a wide margin, so the two terms agree there and the contrastive term acts mainly on confusable
  pairs; a softer τ (CLIP's 0.07 initial value) keeps pulling predictions toward the text modality across the
  modality gap. For another CLIP (e.g. the miniature world's) pass ``1 / clip.logit_scale.exp()``.
- **Distributed**: under an initialised process group with world size > 1, the text embeddings of all ranks are
  gathered so each local prediction is contrasted with the *global* batch (more negatives, as a single-GPU batch of
  the global size would have). Only local rows are scored ("local loss", as open_clip's ``local_loss=True``), so
  predictions need not be gathered. If the text embeddings require grad, the gather carries gradients back to
  their owners, which together with DDP's gradient averaging gives exactly the gradient of the global-batch loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

DEFAULT_TEMPERATURE = 0.01
DEFAULT_LAMBDA = 0.2


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_padded(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """all_gather of (n_r, D) tensors whose n_r differ: pad to the largest, gather, strip the padding."""
    most = max(sizes)
    padded = local.new_zeros(most, *local.shape[1:])
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """Gather rows from every rank; backward sums each rank's gradient for our rows (all_reduce) and keeps ours."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return _gather_padded(local, sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # Every rank's loss depends on our rows through its copy of the gathered tensor; summing those
        # contributions is what the global loss needs (all_reduce works on gloo and nccl alike).
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def gather_across_ranks(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``local`` (n_r, D) of all ranks in rank order; return it and the offset of our rows.

    Without a process group (or with one rank) this returns ``(local, 0)``. Gradients flow back to the local rows
    only if ``local`` requires grad (see the module docstring).
    """
    if not _distributed():
        return local, 0
    size = torch.tensor([len(local)], device=local.device)
    sizes_t = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes_t, size)
    sizes = [int(s) for s in sizes_t]
    offset = sum(sizes[: dist.get_rank()])
    if local.requires_grad:
        return _GatherWithGrad.apply(local, sizes), offset
    return _gather_padded(local, sizes), offset


def contrastive_loss(
    pred_image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    gather: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image → text InfoNCE of Eq. 1 on L2-normalised embeddings.

    Args:
        pred_image_embeds: (B, D) predicted image embeddings (rows).
        text_embeds: (B, D) pooled text embeddings of the same samples (columns; gathered across ranks).
        temperature: τ.
        gather: use the global batch's texts as negatives when running distributed.

    Returns:
        (loss, accuracy): the mean over local rows of -log softmax_j(⟨ẑ_i, z_j⟩/τ)[i], and the detached
        fraction of rows whose own caption scores highest.
    """
    images = F.normalize(pred_image_embeds.float(), dim=-1)
    texts = F.normalize(text_embeds.float(), dim=-1)
    offset = 0
    if gather:
        texts, offset = gather_across_ranks(texts)
    logits = images @ texts.T / temperature  # (B, B_global)
    labels = torch.arange(len(images), device=images.device) + offset
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.detach().argmax(dim=-1) == labels).float().mean()
    return loss, accuracy


def prior_loss(
    pred_image_embeds: torch.Tensor,
    target_image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    lambda_contrastive: float = DEFAULT_LAMBDA,
    temperature: float = DEFAULT_TEMPERATURE,
    gather: bool = True,
) -> dict[str, torch.Tensor]:
    """Eq. 1 (see the module docstring for every convention).

    Args:
        pred_image_embeds: (B, D) the prior's predicted CLIP image embeddings ẑ_x.
        target_image_embeds: (B, D) the CLIP image embeddings z_x of the whole images.
        text_embeds: (B, D) the pooled text embeddings z_y of the captions.
        lambda_contrastive: λ (the paper: 0.2; 0 = projection loss only).
        temperature: τ of the contrastive term.
        gather: contrast against the texts of all ranks when running distributed.

    Returns:
        ``loss`` = ``mse`` + λ · ``contrastive`` (the one to backpropagate), the two terms, and ``accuracy``
        (detached in-batch image → text top-1 retrieval, for logging). All are fp32 scalars.
    """
    if pred_image_embeds.shape != target_image_embeds.shape or pred_image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"prior_loss needs three (B, D) tensors of one shape, got {tuple(pred_image_embeds.shape)}, "
            f"{tuple(target_image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    mse = F.mse_loss(pred_image_embeds.float(), target_image_embeds.float())
    if lambda_contrastive == 0:
        # Skip the gather too: every rank takes this branch, so no collective is left waiting.
        zero = mse.new_zeros(())
        return {"loss": mse, "mse": mse, "contrastive": zero, "accuracy": zero}
    contrastive, accuracy = contrastive_loss(pred_image_embeds, text_embeds, temperature, gather)
    return {
        "loss": mse + lambda_contrastive * contrastive,
        "mse": mse,
        "contrastive": contrastive,
        "accuracy": accuracy,
    }


# ------------------------------------------------------------------------------------------------ Eq. 2
def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the decoder UNet must predict, following ``scheduler.config.prediction_type``.

    latents, noise: (B, C, h, w); timesteps: (B,). ε (Kandinsky 2.2) -> the noise; v -> ``scheduler.get_velocity``;
    "sample" -> the clean latents.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, not {kind!r}")


def decoder_loss(
    predicted: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler, snr_gamma: float = 0.0
) -> dict[str, torch.Tensor]:
    """Eq. 2: ‖target − UNet(z_t, t, z_x)‖², the MSE per sample averaged over the batch.

    Args:
        predicted: (B, C, h, w) the UNet's prediction with the learned-variance channels already dropped.
        target: (B, C, h, w) from :func:`diffusion_target`.
        timesteps: (B,) the noise levels drawn.
        scheduler: the decoder's training scheduler (its ``alphas_cumprod`` give the SNR).
        snr_gamma: Min-SNR-γ weighting (Hang et al. 2023) when > 0: min(SNR, γ)/SNR on an ε loss,
            min(SNR, γ)/(SNR + 1) on a v loss, so every timestep weighs like the x0 error clipped at γ.
    """
    per_sample = F.mse_loss(predicted.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma <= 0:
        return {"loss": per_sample.mean()}
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=snr_gamma)
    kind = scheduler.config.prediction_type
    weight = clipped / (snr + 1) if kind == "v_prediction" else clipped / snr if kind == "epsilon" else clipped
    return {"loss": (weight * per_sample).mean(), "mse": per_sample.mean().detach()}


# ------------------------------------------------------------------------------------------------ CLIP
def clip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_ids: torch.Tensor,
    logit_scale: torch.Tensor,
    negative_text_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric CLIP InfoNCE with multi-positive targets (training a CLIP, as the miniature world does).

    Args:
        image_embeds, text_embeds: (B, D) paired embeddings (normalised here).
        text_ids: (B, L) the texts' token ids: every identical text is a positive, so the loss never pushes apart
            two images that fit the same words.
        logit_scale: CLIP's learned log scale (its exp is clamped at 100, as in CLIP).
        negative_text_embeds: (K, D) texts that match no image (hard negatives), added to each image's candidates
            (image → text only: a negative text has no image of its own).
    """
    images = F.normalize(image_embeds, dim=-1)
    texts = F.normalize(text_embeds, dim=-1)
    scale = logit_scale.exp().clamp(max=100.0)
    logits = scale * images @ texts.T  # (B, B)
    same = (text_ids[:, None, :] == text_ids[None, :, :]).all(-1).float()
    targets = same / same.sum(1, keepdim=True)
    image_logits, image_targets = logits, targets
    if negative_text_embeds is not None:
        image_logits = torch.cat([logits, scale * images @ F.normalize(negative_text_embeds, dim=-1).T], 1)
        image_targets = F.pad(targets, (0, len(negative_text_embeds)))
    return 0.5 * (-(image_targets * image_logits.log_softmax(1)).sum(1).mean()
                  - (targets * logits.log_softmax(0)).sum(0).mean())
