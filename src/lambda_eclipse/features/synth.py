"""A synthetic feature store with learnable structure, so the prior trainer can be exercised without any encoder.

The world (fixed by ``world_seed``; train and validation stores share it and differ in ``seed``):

- A vocabulary of subject nouns (some two tokens, like "teddy bear"), scenes and glue words. Every token has a
  fixed random "text state" vector (entries ~ N(0, 1), the scale of a LayerNorm'd CLIP hidden state); a sample's
  token states are the contextless vectors of its tokens plus noise, with BOS first and EOS last.
- Every subject class has an image-space vector; every scene has one too.
- A sample draws 1-4 distinct subjects, a scene, a random *appearance* vector per subject and a random *layout*
  vector, none of which the caption mentions.

What a sample stores (D = dim; ``r·normalize`` = rescaled to norm r = ``embed_norm``, default √D):

- ``subject_embeds[k] = r·normalize(class_k + appearance_k + noise)``: the subject crop embedding.
- ``target = r·normalize(scene + Σ_k (class_k + appearance_k) + layout)``: the whole-image embedding.
- ``pooled_text = r·normalize(P · mean(token vectors))``: a fixed projection of the words only.
- ``edge = r·normalize(R · layout + noise)`` for ``edge_prob`` of the samples.

Why norm √D (entries of RMS 1) rather than 1: Eq. 1's projection MSE is a mean over elements, so with unit-norm
targets it would start near 1/D and λ·InfoNCE (~λ·log B) would drive training alone — the prior would learn to
match captions, not images (measured: its predictions stayed near cosine 0 to the targets).

So text alone can predict the scene and class part of the target, the subject embeddings add the appearance
(their binding to the right words matters only through their position), and the edge adds the layout: a prior that
reads the subject embeddings beats a text-only one, as in the paper. ``tests/test_features.py`` checks this with a
linear probe.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import UserError
from .schema import FeatureSample
from .writer import FeatureWriter

SUBJECT_NOUNS: tuple[str, ...] = (
    "dog", "cat", "hat", "car", "chair", "cup", "robot", "bird", "lamp", "boot",
    "teddy bear", "vase", "clock", "guitar", "backpack", "paper plane",
)  # fmt: skip
SCENES: tuple[str, ...] = (
    "beach", "kitchen", "forest", "street", "desert", "snow", "garden", "office", "river", "stage", "library", "moon",
)  # fmt: skip
GLUE: tuple[str, ...] = ("a", "and", "in", "the", "with", "on", "<bos>", "<eos>")
SUBJECT_PROBS: tuple[float, ...] = (0.4, 0.3, 0.2, 0.1)
"""P(1..4 subjects). The paper's data is mostly single-subject (74/22/3/1 %); more multi-subject samples here make
the binding visible in a small store."""


@dataclass
class SynthWorld:
    """The fixed vectors of a synthetic world (see the module docstring). Shapes: V tokens, D dim."""

    dim: int
    vocab: list[str]
    token_vectors: torch.Tensor  # (V, D) text states, entries ~ N(0, 1)
    class_vectors: torch.Tensor  # (num subject nouns, D) image space, norm ~ 1
    scene_vectors: torch.Tensor  # (num scenes, D) image space, norm ~ 1
    text_projection: torch.Tensor  # (D, D) words -> pooled text embedding
    edge_projection: torch.Tensor  # (D, D) layout -> edge embedding
    zero_image: torch.Tensor  # (D,) the world's "embedding of an all-zero image": control input without an edge

    @classmethod
    def create(cls, dim: int, world_seed: int = 0) -> SynthWorld:
        g = torch.Generator().manual_seed(world_seed)
        vocab = list(GLUE) + list(SCENES) + sorted({w for noun in SUBJECT_NOUNS for w in noun.split()})
        unit = lambda n: torch.randn(n, dim, generator=g) / math.sqrt(dim)  # noqa: E731 - rows of norm ~ 1
        return cls(
            dim=dim,
            vocab=vocab,
            token_vectors=torch.randn(len(vocab), dim, generator=g),
            class_vectors=unit(len(SUBJECT_NOUNS)),
            scene_vectors=unit(len(SCENES)),
            text_projection=torch.randn(dim, dim, generator=g) / math.sqrt(dim),
            edge_projection=torch.randn(dim, dim, generator=g) / math.sqrt(dim),
            zero_image=torch.randn(dim, generator=g),  # entries of RMS 1, like the embeddings (norm √D)
        )

    def token_ids(self, words: Sequence[str]) -> list[int]:
        return [self.vocab.index(w) for w in words]

    def sample(
        self,
        g: torch.Generator,
        source_id: str,
        edge_prob: float,
        noise: float,
        subject_probs: Sequence[float],
        embed_norm: float,
    ) -> FeatureSample:
        """Draw one sample (see the module docstring)."""
        dim = self.dim
        count = int(torch.multinomial(torch.tensor(subject_probs, dtype=torch.float64), 1, generator=g)) + 1
        classes = torch.randperm(len(SUBJECT_NOUNS), generator=g)[:count].tolist()
        scene = int(torch.randint(len(SCENES), (1,), generator=g))
        words, owner = ["<bos>"], [-1]
        for k, c in enumerate(classes):
            glue = ["a"] if k == 0 else ["and", "a"]
            noun = SUBJECT_NOUNS[c].split()
            words += glue + noun
            owner += [-1] * len(glue) + [k] * len(noun)
        tail = ["in", "the", SCENES[scene], "<eos>"]
        words, owner = words + tail, owner + [-1] * len(tail)
        ids = torch.tensor(self.token_ids(words))
        states = self.token_vectors[ids] + noise * torch.randn(len(ids), dim, generator=g)

        appearance = torch.randn(count, dim, generator=g) / math.sqrt(dim)
        layout = 0.5 * torch.randn(dim, generator=g) / math.sqrt(dim)
        subject = self.class_vectors[classes] + appearance  # (S, D)
        crops = subject + noise * torch.randn(count, dim, generator=g) / math.sqrt(dim)
        target = self.scene_vectors[scene] + subject.sum(0) + layout
        pooled = self.text_projection @ self.token_vectors[ids].mean(0)
        has_edge = bool(torch.rand(1, generator=g) < edge_prob)
        edge = self.edge_projection @ layout + noise * torch.randn(dim, generator=g) / math.sqrt(dim)
        unit = lambda x: embed_norm * torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
        return FeatureSample(
            caption=" ".join(words[1:-1]),
            token_states=states,
            pooled_text=unit(pooled),
            subject_embeds=unit(crops),
            token_subject=torch.tensor(owner, dtype=torch.int64),
            target=unit(target),
            edge=unit(edge) if has_edge else None,
            source_id=source_id,
        )


def longest_caption_tokens(max_subjects: int = 4) -> int:
    """Tokens of the longest synthetic caption (BOS, subjects with glue, "in the SCENE", EOS)."""
    longest_noun = max(len(n.split()) for n in SUBJECT_NOUNS)
    return 1 + 1 + longest_noun + (max_subjects - 1) * (2 + longest_noun) + 3 + 1


def synthesize_features(
    out_dir: str | os.PathLike[str],
    num_samples: int,
    dim: int = 128,
    max_text_len: int = 32,
    seed: int = 0,
    world_seed: int = 0,
    shard_size: int = 1024,
    edge_prob: float = 0.5,
    noise: float = 0.05,
    subject_probs: Sequence[float] = SUBJECT_PROBS,
    embed_norm: float | None = None,
) -> SynthWorld:
    """Write ``num_samples`` synthetic samples to a new store at ``out_dir`` and return the world.

    Args:
        seed: the sample stream (use different seeds for train and validation stores of one world).
        world_seed: the fixed world (vocabulary vectors, classes, scenes, projections).
        edge_prob: fraction of samples that get an edge embedding.
        noise: noise level of token states and embeddings relative to their signal.
        subject_probs: probabilities of 1, 2, 3 and 4 subjects.
        embed_norm: norm of every stored embedding (default √dim; see the module docstring).
    """
    if len(subject_probs) != 4 or abs(sum(subject_probs) - 1) > 1e-6:
        raise UserError("subject_probs must give the probabilities of 1, 2, 3 and 4 subjects, summing to 1")
    if max_text_len < longest_caption_tokens():
        raise UserError(f"synthetic captions need max_text_len >= {longest_caption_tokens()}, got {max_text_len}")
    world = SynthWorld.create(dim, world_seed)
    embed_norm = math.sqrt(dim) if embed_norm is None else embed_norm
    g = torch.Generator().manual_seed(seed + 0x5EED)
    metadata = {
        "synthetic": {"world_seed": world_seed, "seed": seed, "edge_prob": edge_prob, "noise": noise,
                      "subject_probs": list(subject_probs), "embed_norm": embed_norm},
    }  # fmt: skip
    with FeatureWriter(
        out_dir,
        dim=dim,
        max_text_len=max_text_len,
        shard_size=shard_size,
        metadata=metadata,
        zero_image=world.zero_image,
    ) as writer:
        for i in range(num_samples):
            writer.add(world.sample(g, f"synth-{seed}-{i:08d}", edge_prob, noise, subject_probs, embed_norm))
    return world
