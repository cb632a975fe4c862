"""The released λ-ECLIPSE prior as the authors' code runs it (FACTS §2b), the baseline for our benchmarks and the
reference the tests compare against: diffusers ``BasicTransformerBlock`` over all 77 + E tokens, a float −10000
additive mask repeated per head, fp32. Same parameter names as the released checkpoint, so
``load_state_dict(LambdaEclipsePrior(...).state_dict())`` works both ways."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from torch import nn


class ReleasedPrior(nn.Module):
    def __init__(self, num_attention_heads=16, attention_head_dim=32, num_layers=10, embedding_dim=1280,
                 num_embeddings=77, additional_embeddings=4):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.heads = num_attention_heads
        self.proj_in = nn.Linear(embedding_dim, inner)
        self.embedding_proj = nn.Linear(embedding_dim, inner)
        self.encoder_hidden_states_proj = nn.Linear(embedding_dim, inner)
        self.embedding_control = nn.Linear(embedding_dim, inner) if additional_embeddings == 4 else None
        self.positional_embedding = nn.Parameter(torch.zeros(1, num_embeddings + additional_embeddings, inner))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, inner))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim, dropout=0.0, activation_fn="gelu",
                                  attention_bias=True)
            for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(inner)
        self.proj_to_clip_embeddings = nn.Linear(inner, embedding_dim)
        self.clip_mean = nn.Parameter(torch.zeros(1, embedding_dim))
        self.clip_std = nn.Parameter(torch.zeros(1, embedding_dim))

    def forward(self, hidden_states, proj_embedding, encoder_hidden_states, attention_mask, control_embedding=None):
        """Inputs as :class:`lambda_eclipse.LambdaEclipsePrior`, text padded to all 77 positions. Returns (B, D)."""
        b = hidden_states.shape[0]
        tokens = [self.encoder_hidden_states_proj(encoder_hidden_states)]
        if self.embedding_control is not None:
            tokens.append(self.embedding_control(control_embedding)[:, None])
        tokens += [self.embedding_proj(proj_embedding)[:, None], self.proj_in(hidden_states)[:, None],
                   self.prd_embedding.expand(b, -1, -1)]
        h = torch.cat(tokens, 1) + self.positional_embedding
        n = h.shape[1]
        mask = (1 - attention_mask.float()) * -10000.0
        mask = F.pad(mask, (0, n - mask.shape[1]), value=0.0)
        causal = torch.full((n, n), -10000.0, device=h.device).triu_(1)
        mask = (mask[:, None, :] + causal).repeat_interleave(self.heads, dim=0)
        for block in self.transformer_blocks:
            h = block(h, attention_mask=mask)
        return self.proj_to_clip_embeddings(self.norm_out(h)[:, -1])
