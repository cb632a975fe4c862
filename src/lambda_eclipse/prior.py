"""The λ-ECLIPSE prior: a small non-diffusion transformer that maps interleaved text/subject token states to one
CLIP image embedding in a single forward pass.

The parameter names and the math follow the released checkpoint ``ECLIPSE-Community/Lambda-ECLIPSE-Prior-v1.0``
(and its text-only sibling ``ECLIPSE-Community/ECLIPSE_KandinskyV22_Prior``), so ``from_pretrained`` loads those
files with strict keys. The released code runs diffusers ``BasicTransformerBlock`` over all 77 + 4 tokens with a
float −10000 mask repeated per head; this module computes the same function faster:

* attention goes through ``scaled_dot_product_attention`` with one boolean mask broadcast over heads;
* text is trimmed to the longest real prompt in the batch. Padded text columns are masked for every query and
  only the last token is read, so dropping them changes nothing. The extra tokens keep positions 77..80;
* the remaining padding of shorter prompts is skipped too: norms, projections and the feed-forward run on the
  packed real tokens only, and only attention sees the padded (B, N) layout, where padding is masked;
* the last block computes attention and the feed-forward for the read-out token only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .errors import UserError


@dataclass
class LambdaEclipsePriorTransformerOutput(BaseOutput):
    """Output of the prior network's forward pass (:class:`LambdaEclipsePrior`); the pipeline's prior-only
    result is :class:`~lambda_eclipse.pipeline.LambdaEclipsePriorOutput`.

    Args:
        predicted_image_embedding: (B, embedding_dim) predicted CLIP image embedding.
    """

    predicted_image_embedding: torch.Tensor


class _Layout:
    """Where the real tokens of a (B, N) batch sit. Per-token work (norms, projections, feed-forward) runs on the
    (M, C) packed real tokens only; attention unpacks keys/values/queries to (B, N) where padding is masked anyway."""

    def __init__(self, real: torch.Tensor) -> None:
        self.batch, self.length = real.shape
        self.dense = bool(real.all())
        self.index = None if self.dense else real.reshape(-1).nonzero().squeeze(1)  # (M,) rows of B*N
        # The read-out token is last in every sequence and always real: its packed row is (#real up to it) - 1.
        self.last = real.reshape(-1).cumsum(0).view(self.batch, self.length)[:, -1] - 1

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (M, C)."""
        flat = x.reshape(self.batch * self.length, -1)
        return flat if self.dense else flat.index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(M, C) -> (B, N, C) with zeros at padded positions."""
        if not self.dense:
            x = x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy(0, self.index, x)
        return x.view(self.batch, self.length, -1)


class _Attention(nn.Module):
    """Multi-head self-attention with the parameter names of diffusers' ``Attention`` (to_q/to_k/to_v/to_out.0)."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, layout: _Layout, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x: (M, dim) packed tokens; mask: (B, 1, Nq, N) bool, True = may attend.
        Returns (M, dim), or (B, dim) for the read-out tokens when ``last_only``."""
        if last_only:
            q = self._heads(self.to_q(x.index_select(0, layout.last))[:, None])  # (B, H, 1, d)
        else:
            q = self._heads(layout.unpack(self.to_q(x)))  # (B, H, N, d)
        k = self._heads(layout.unpack(self.to_k(x)))
        v = self._heads(layout.unpack(self.to_v(x)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], self.heads * self.head_dim)
        out = out[:, 0] if last_only else layout.pack(out)
        return self.to_out[1](self.to_out[0](out))


class _GELUProj(nn.Module):
    """Linear + exact GELU, named like diffusers' ``GELU`` activation module (``ff.net.0.proj``)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.ModuleList([_GELUProj(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class _Block(nn.Module):
    """Pre-LN self-attention block, the released ``BasicTransformerBlock`` without cross-attention (norm1, attn1,
    norm3, ff)."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = _Attention(dim, heads, head_dim, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = _FeedForward(dim, dropout)

    def forward(self, x: torch.Tensor, layout: _Layout, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x: (M, dim) packed tokens -> (M, dim), or (B, dim) read-out tokens when ``last_only``."""
        attended = self.attn1(self.norm1(x), layout, mask, last_only=last_only)
        x = (x.index_select(0, layout.last) if last_only else x) + attended
        return x + self.ff(self.norm3(x))


class LambdaEclipsePrior(ModelMixin, ConfigMixin):
    """λ-ECLIPSE prior (paper §3, appendix C): 10 layers, 16 heads × 32, width 512, CLIP dim 1280, 77 text tokens
    plus ``additional_embeddings`` extra tokens ([control,] pooled text, noise, read-out). No time embedding.

    The constructor arguments are the released ``config.json`` keys; the ones that describe diffusers'
    ``PriorTransformer`` options this network does not have must keep their released values.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 32,
        num_layers: int = 10,
        embedding_dim: int = 1280,
        num_embeddings: int = 77,
        additional_embeddings: int = 4,
        dropout: float = 0.0,
        added_emb_type: str | None = "prd",
        encoder_hid_proj_type: str | None = "linear",
        norm_in_type: str | None = None,
        embedding_proj_norm_type: str | None = None,
        embedding_proj_dim: int | None = None,
        clip_embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        unsupported = {
            "added_emb_type": (added_emb_type, "prd"),
            "encoder_hid_proj_type": (encoder_hid_proj_type, "linear"),
            "norm_in_type": (norm_in_type, None),
            "embedding_proj_norm_type": (embedding_proj_norm_type, None),
        }
        for key, (value, expected) in unsupported.items():
            if value != expected:
                raise UserError(f"LambdaEclipsePrior supports {key}={expected!r} only, got {value!r}")
        if embedding_proj_dim not in (None, embedding_dim) or clip_embed_dim not in (None, embedding_dim):
            raise UserError("LambdaEclipsePrior needs embedding_proj_dim and clip_embed_dim unset or == embedding_dim")
        if additional_embeddings not in (3, 4):
            raise UserError(f"additional_embeddings must be 3 (text-only ECLIPSE) or 4 (λ-ECLIPSE), got {additional_embeddings}")
        inner = num_attention_heads * attention_head_dim
        self.proj_in = nn.Linear(embedding_dim, inner)
        self.embedding_proj = nn.Linear(embedding_dim, inner)
        self.encoder_hidden_states_proj = nn.Linear(embedding_dim, inner)
        # The control (Canny edge) token exists only in the λ prior: 4 extra tokens = control, text, noise, read-out.
        self.embedding_control = nn.Linear(embedding_dim, inner) if additional_embeddings == 4 else None
        self.positional_embedding = nn.Parameter(torch.zeros(1, num_embeddings + additional_embeddings, inner))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, inner))
        self.transformer_blocks = nn.ModuleList(
            [_Block(inner, num_attention_heads, attention_head_dim, dropout) for _ in range(num_layers)]
        )
        self.norm_out = nn.LayerNorm(inner)
        self.proj_to_clip_embeddings = nn.Linear(inner, embedding_dim)
        # Kept for checkpoint compatibility; the released pipeline never de-normalises with them.
        self.clip_mean = nn.Parameter(torch.zeros(1, embedding_dim))
        self.clip_std = nn.Parameter(torch.zeros(1, embedding_dim))

    @property
    def has_control(self) -> bool:
        """Whether the prior has the Canny/control token (λ-ECLIPSE) or not (text-only ECLIPSE)."""
        return self.embedding_control is not None

    def forward(
        self,
        hidden_states: torch.Tensor,
        proj_embedding: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        control_embedding: torch.Tensor | None = None,
        return_dict: bool = True,
        trim: bool = True,
    ) -> LambdaEclipsePriorTransformerOutput | tuple[torch.Tensor]:
        """Predict the CLIP image embedding.

        Args:
            hidden_states: (B, D) noise token (the released pipeline draws it from N(0, I)).
            proj_embedding: (B, D) pooled, projected text embedding of the unmodified prompt.
            encoder_hidden_states: (B, L, D) interleaved token states, L ≤ num_embeddings.
            attention_mask: (B, L) bool/0-1, True for real tokens; None means all real.
            control_embedding: (B, D) edge-map CLIP image embedding (the zero-image embedding when absent).
                Required by λ priors, rejected by text-only priors.
            trim: drop text positions after the longest real prompt (exact; see the module docstring).

        Returns:
            :class:`LambdaEclipsePriorTransformerOutput` with ``predicted_image_embedding`` (B, D).
        """
        cfg = self.config
        batch, text_len = encoder_hidden_states.shape[:2]
        if text_len > cfg.num_embeddings:
            raise UserError(f"encoder_hidden_states has {text_len} tokens; this prior takes at most {cfg.num_embeddings}")
        if self.has_control and control_embedding is None:
            raise UserError("this λ prior needs control_embedding (pass the zero-image embedding when there is no edge map)")
        if not self.has_control and control_embedding is not None:
            raise UserError("this text-only ECLIPSE prior has no control token; pass control_embedding=None")
        device = encoder_hidden_states.device
        if attention_mask is None:
            attention_mask = torch.ones(batch, text_len, dtype=torch.bool, device=device)
        attention_mask = attention_mask.to(device=device, dtype=torch.bool)
        if trim:
            real = attention_mask.any(dim=0).nonzero()
            text_len = int(real.max()) + 1 if len(real) else 1
            encoder_hidden_states, attention_mask = encoder_hidden_states[:, :text_len], attention_mask[:, :text_len]

        dtype = self.proj_in.weight.dtype
        extra = [self.embedding_proj(proj_embedding.to(dtype)), self.proj_in(hidden_states.to(dtype))]
        if self.has_control:
            extra.insert(0, self.embedding_control(control_embedding.to(dtype)))
        extra.append(self.prd_embedding.to(dtype).expand(batch, -1, -1)[:, 0])
        tokens = torch.cat([self.encoder_hidden_states_proj(encoder_hidden_states.to(dtype)), torch.stack(extra, dim=1)], 1)
        # Text keeps positions 0..L-1 and the extra tokens always keep positions num_embeddings.. (77..80).
        pos = self.positional_embedding.to(dtype)
        tokens = tokens + torch.cat([pos[:, :text_len], pos[:, cfg.num_embeddings :]], dim=1)

        mask = self._attention_mask(attention_mask, cfg.additional_embeddings)
        real = torch.cat([attention_mask, attention_mask.new_ones(batch, cfg.additional_embeddings)], dim=1)
        # Without trimming every position is computed, as the released code does.
        layout = _Layout(real if trim else torch.ones_like(real))
        tokens = layout.pack(tokens)
        for i, block in enumerate(self.transformer_blocks):
            last = i == len(self.transformer_blocks) - 1
            tokens = block(tokens, layout, mask[:, :, -1:] if last else mask, last_only=last)
        predicted = self.proj_to_clip_embeddings(self.norm_out(tokens))
        if not return_dict:
            return (predicted,)
        return LambdaEclipsePriorTransformerOutput(predicted_image_embedding=predicted)

    @staticmethod
    def _attention_mask(text_mask: torch.Tensor, num_extra: int) -> torch.Tensor:
        """(B, L) text mask -> (B, 1, L+E, L+E) bool: causal, and padded text columns blocked for every query.

        Each token may also attend to itself. That only changes the rows of padded tokens, which no real token
        reads, and keeps every row non-empty so that attention never produces NaN.
        """
        batch, text_len = text_mask.shape
        n = text_len + num_extra
        keys = torch.cat([text_mask, text_mask.new_ones(batch, num_extra)], dim=1)
        causal = torch.ones(n, n, dtype=torch.bool, device=text_mask.device).tril_()
        eye = torch.eye(n, dtype=torch.bool, device=text_mask.device)
        return (causal[None, None] & keys[:, None, None, :]) | eye
