"""The feature-store schema: one training sample, the shard layout and the ``index.json`` that lists shards.

A store is a directory::

    index.json                      the store's metadata and the list of committed shards (written last)
    zero_image.safetensors          (D,) fp32 zero-image embedding: the control input when there is no edge map
    shard-00000.safetensors         N samples, concatenated (layout below)
    shard-00001.safetensors         ...

Each shard is one safetensors file whose tensors concatenate N samples; variable-length parts (token states,
subjects, edges, strings) are stored flat with per-sample offsets (row ``i`` of a part is
``part[offsets[i]:offsets[i + 1]]``), so nothing is padded on disk:

=====================  ===============  ===========================================================
tensor                 shape / dtype    meaning
=====================  ===============  ===========================================================
``token_states``       (T, D) fp16      last-layer text states of the real tokens (BOS..EOS), T = ΣL
``token_offsets``      (N+1,) int64     sample i owns rows ``[token_offsets[i], token_offsets[i+1])``
``token_subject``      (T,) int8        per row of token_states: its subject (0..S_i-1) or -1
``pooled_text``        (N, D) fp16      projected pooled embedding of the unmodified caption
``target``             (N, D) fp16      CLIP image embedding of the whole image
``subject_embeds``     (S, D) fp16      subject crop embeddings, S = Σ subjects
``subject_offsets``    (N+1,) int64     sample i owns subjects ``[subject_offsets[i], ...[i+1])``
``edge``               (E, D) fp16      Canny-edge embeddings of the samples that have one
``edge_index``         (N,) int32       row of ``edge`` for sample i, or -1 when it has none
``caption_bytes``      (C,) uint8       UTF-8 captions, concatenated; ``caption_offsets`` (N+1,)
``source_id_bytes``    (I,) uint8       UTF-8 source ids, concatenated; ``source_id_offsets`` (N+1,)
=====================  ===============  ===========================================================

Why fp16 for every vector, not only the token states: fp16 keeps 11 significant bits, a relative rounding error of
at most 2^-11 ≈ 4.9e-4 per element, which moves a vector's direction by about that much; the cosine similarity
between a CLIP embedding and its fp16 copy is 1 - O(1e-7) (checked in the tests: > 0.99999). The released prior and
the decoder run in fp16 anyway. It keeps a paper-scale sample (16 tokens, 2.5 subjects, edge, D=1280) at ~55 KB.
The writer refuses values that overflow fp16 (|x| > 65504) instead of storing inf.

Why a per-token owner index rather than one [start, end) span per subject: a caption may name a subject more than
once ("a dog next to a cat, the dog sits"), and inference binds every occurrence
(:func:`lambda_eclipse.conditioning.subject_token_index`); the store keeps exactly that index, so training binds
the same tokens. int8 holds up to 127 subjects per sample and costs 1 byte per token next to the 2·D of its state.

Schema versions: 2 stores ``token_subject``; 1 stored one [start, end) span per subject (the first occurrence only)
and is refused with a request to rebuild.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write
from ..checks import first_nonfinite
from ..errors import UserError

FORMAT_NAME = "lambda-eclipse-features"
SCHEMA_VERSION = 2
INDEX_NAME = "index.json"
ZERO_IMAGE_NAME = "zero_image.safetensors"
STORAGE_DTYPE = torch.float16
FP16_MAX = 65504.0
MAX_SUBJECTS = 127  # token_subject is int8

#: Tensor names of a shard and their dtypes (``None`` = the storage float dtype).
SHARD_TENSORS: dict[str, torch.dtype | None] = {
    "token_states": None,
    "token_offsets": torch.int64,
    "token_subject": torch.int8,
    "pooled_text": None,
    "target": None,
    "subject_embeds": None,
    "subject_offsets": torch.int64,
    "edge": None,
    "edge_index": torch.int32,
    "caption_bytes": torch.uint8,
    "caption_offsets": torch.int64,
    "source_id_bytes": torch.uint8,
    "source_id_offsets": torch.int64,
}


def shard_file_name(number: int) -> str:
    """The file name of shard ``number`` (zero-padded so that names sort in write order)."""
    return f"shard-{number:05d}.safetensors"


@dataclass
class FeatureSample:
    """One training sample (shapes for D = feature dim, L = real tokens, S = subjects).

    Attributes:
        caption: the image caption.
        token_states: (L, D) text-encoder last-layer states of the real tokens only, BOS at position 0.
        pooled_text: (D,) projected pooled text embedding of the unmodified caption.
        subject_embeds: (S, D) CLIP image embeddings of the subject crops (S = 0..4 in the paper: 1-4).
        token_subject: (L,) int, for each token the subject (row of ``subject_embeds``) it is bound to, or -1;
            every occurrence of a subject's word is bound (see :func:`lambda_eclipse.conditioning.subject_token_index`).
        target: (D,) CLIP image embedding of the whole image.
        edge: (D,) CLIP embedding of the image's Canny edge map, or None.
        source_id: where the sample came from (e.g. a LAION key); used for resume and de-duplication.
    """

    caption: str
    token_states: torch.Tensor
    pooled_text: torch.Tensor
    subject_embeds: torch.Tensor
    token_subject: torch.Tensor
    target: torch.Tensor
    edge: torch.Tensor | None = None
    source_id: str = ""

    @classmethod
    def coerce(cls, sample: FeatureSample | Mapping[str, Any]) -> FeatureSample:
        """Accept a :class:`FeatureSample` or a mapping with the same keys (``edge``/``source_id`` optional)."""
        if isinstance(sample, FeatureSample):
            return sample
        missing = {"caption", "token_states", "pooled_text", "subject_embeds", "token_subject", "target"} - set(sample)
        if missing:
            raise ValueError(f"feature sample lacks {sorted(missing)}")
        known = {k: sample[k] for k in cls.__dataclass_fields__ if k in sample}
        return cls(**known)

    def __repr__(self) -> str:  # the default repr would print every tensor
        return (
            f"FeatureSample(caption={self.caption!r}, tokens={self.num_tokens}, subjects={self.num_subjects}, "
            f"dim={self.token_states.shape[-1]}, edge={self.edge is not None}, source_id={self.source_id!r})"
        )

    @property
    def num_tokens(self) -> int:
        return int(self.token_states.shape[0])

    @property
    def num_subjects(self) -> int:
        return int(self.subject_embeds.shape[0])


def token_subject_problem(
    token_subject: torch.Tensor, tokens_per_sample: torch.Tensor, subjects_per_sample: torch.Tensor
) -> str | None:
    """The first problem of the owner index of N samples stored back to back, or None.

    Args:
        token_subject: (T,) integer owner index (T = Σ tokens_per_sample).
        tokens_per_sample, subjects_per_sample: (N,) integer counts.

    Values must be -1 or a subject of the token's own sample, and every subject must own at least one token (a
    subject bound to no word would never reach the prior; the builder never writes one).
    """
    owner = token_subject.to(torch.int64)
    tokens, subjects = tokens_per_sample.to(torch.int64), subjects_per_sample.to(torch.int64)
    sample_of = torch.repeat_interleave(torch.arange(len(tokens)), tokens)  # (T,)
    bad = (owner < -1) | (owner >= subjects[sample_of])
    if bool(bad.any()):
        t = int(bad.nonzero()[0])
        i = int(sample_of[t])
        row, of = t - int(tokens[:i].sum()), f" of sample {i}" if len(tokens) > 1 else ""
        allowed = f"-1 or a subject index in 0..{int(subjects[i]) - 1}" if subjects[i] else "-1 (no subjects)"
        return f"token_subject holds {int(owner[t])} at token {row}{of}; it must be {allowed}"
    first_subject = subjects.cumsum(0) - subjects  # (N,) row of each sample's subject 0 among all subjects
    bound = owner >= 0
    owned = torch.bincount(first_subject[sample_of[bound]] + owner[bound], minlength=int(subjects.sum()))
    if bool((owned == 0).any()):
        g = int((owned == 0).nonzero()[0])
        i = int(torch.searchsorted(first_subject, g, right=True)) - 1
        of = f" of sample {i}" if len(tokens) > 1 else ""
        return f"subject {g - int(first_subject[i])}{of} owns no token in token_subject; bind it to its word"
    return None


def check_sample(sample: FeatureSample, dim: int, max_text_len: int) -> None:
    """Raise ``ValueError`` naming the first problem of ``sample`` against a store of (dim, max_text_len)."""
    where = f"sample {sample.source_id!r}" if sample.source_id else "sample"
    tokens = sample.token_states
    if tokens.dim() != 2 or tokens.shape[1] != dim:
        raise ValueError(f"{where}: token_states must be (L, {dim}), got {tuple(tokens.shape)}")
    if not 1 <= tokens.shape[0] <= max_text_len:
        raise ValueError(f"{where}: {tokens.shape[0]} tokens; the store takes 1..{max_text_len} (no padding)")
    for name in ("pooled_text", "target") + (("edge",) if sample.edge is not None else ()):
        value = getattr(sample, name)
        if tuple(value.shape) != (dim,):
            raise ValueError(f"{where}: {name} must be ({dim},), got {tuple(value.shape)}")
    subjects, owner = sample.subject_embeds, sample.token_subject
    if subjects.dim() != 2 or subjects.shape[1] != dim:
        raise ValueError(f"{where}: subject_embeds must be (S, {dim}), got {tuple(subjects.shape)}")
    if len(subjects) > MAX_SUBJECTS:
        raise ValueError(f"{where}: {len(subjects)} subjects; the store takes at most {MAX_SUBJECTS} per sample")
    if tuple(owner.shape) != (len(tokens),):
        raise ValueError(f"{where}: token_subject must be ({len(tokens)},), one per token, got {tuple(owner.shape)}")
    if owner.is_floating_point() or owner.is_complex() or owner.dtype == torch.bool:
        raise ValueError(f"{where}: token_subject must be integers, got {owner.dtype}")
    problem = token_subject_problem(owner, torch.tensor([len(tokens)]), torch.tensor([len(subjects)]))
    if problem:
        raise ValueError(f"{where}: {problem}")
    for name in ("token_states", "pooled_text", "target", "subject_embeds", "edge"):
        value = getattr(sample, name)
        if value is None or value.numel() == 0:
            continue
        if not value.is_floating_point():
            raise ValueError(f"{where}: {name} must be floating point, got {value.dtype}")
        if first_nonfinite(value) is not None:
            raise ValueError(f"{where}: {name} has NaN or inf")
        if float(value.abs().max()) > FP16_MAX:
            raise ValueError(f"{where}: {name} exceeds the fp16 range (|x| > {FP16_MAX:g}); rescale before storing")


class SchemaVersionError(ValueError):
    """An index of another schema version; :func:`read_index` turns it into a one-line :class:`UserError`."""

    def __init__(self, version: object) -> None:
        super().__init__(f"schema version {version!r}")
        self.version = version

    def explain(self, where: str) -> str:
        if self.version == 1:
            return (
                f"feature store {where!r} uses schema version 1 (one span per subject); "
                "rebuild it with this version of lambda-eclipse"
            )
        if isinstance(self.version, int) and self.version > SCHEMA_VERSION:
            return (
                f"feature store {where!r} uses schema version {self.version}, newer than this lambda-eclipse reads "
                f"({SCHEMA_VERSION}); upgrade lambda-eclipse"
            )
        return f"feature store {where!r} has an unknown schema version {self.version!r}; rebuild it"


@dataclass
class ShardInfo:
    """One committed shard as listed in ``index.json``."""

    file: str
    num_samples: int
    num_tokens: int
    num_subjects: int
    num_edges: int
    nbytes: int


@dataclass
class StoreIndex:
    """The contents of ``index.json``: the store's dims, dtype, schema version and shard list."""

    dim: int
    max_text_len: int
    shards: list[ShardInfo] = field(default_factory=list)
    dtype: str = "float16"
    format: str = FORMAT_NAME
    version: int = SCHEMA_VERSION
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def to_json(self) -> str:
        data = asdict(self)
        data["num_samples"] = self.num_samples  # redundant, for people reading the file
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> StoreIndex:
        data = json.loads(text)
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"not a {FORMAT_NAME} index (format={data.get('format')!r})")
        if data.get("version") != SCHEMA_VERSION:
            raise SchemaVersionError(data.get("version"))
        shards = [ShardInfo(**s) for s in data.pop("shards")]
        data.pop("num_samples", None)
        return cls(shards=shards, **data)


def read_index(directory: str | os.PathLike[str]) -> StoreIndex:
    """Load ``DIR/index.json``; user mistakes (no dir, no index, wrong file) raise :class:`UserError`."""
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"feature store {str(root)!r} does not exist; pass the directory a FeatureWriter wrote")
    path = root / INDEX_NAME
    if not path.is_file():
        raise UserError(
            f"{str(root)!r} has no {INDEX_NAME}; it is not a feature store (build one first, "
            "e.g. `lambda-eclipse build` or lambda_eclipse.features.synthesize_features)"
        )
    try:
        return StoreIndex.from_json(path.read_text())
    except SchemaVersionError as err:
        raise UserError(err.explain(str(root))) from None
    except (ValueError, TypeError, KeyError) as err:
        raise UserError(f"{str(path)!r} is not a readable feature index ({err}); rebuild the store") from err


def write_index(directory: str | os.PathLike[str], index: StoreIndex) -> None:
    """Atomically (re)write ``DIR/index.json``."""
    atomic_write(Path(directory) / INDEX_NAME, index.to_json(), fsync=True)


def write_zero_image(directory: str | os.PathLike[str], zero_image: torch.Tensor) -> None:
    """Store the (D,) zero-image embedding (CLIP image embedding of all-zero pixel values) next to the index.

    The trainer feeds it as the control embedding of samples without an edge map, as the released pipeline does;
    it belongs to the store because it depends on the image encoder that made the features. Kept in fp32.
    """
    from safetensors.torch import save

    data = save({"zero_image": zero_image.detach().reshape(-1).to("cpu", torch.float32).contiguous()})
    atomic_write(Path(directory) / ZERO_IMAGE_NAME, data, fsync=True)


def read_zero_image(directory: str | os.PathLike[str]) -> torch.Tensor:
    """The store's (D,) fp32 zero-image embedding; a store without one raises :class:`UserError`."""
    from safetensors.torch import load_file

    index = read_index(directory)
    path = Path(directory) / ZERO_IMAGE_NAME
    if not path.is_file():
        raise UserError(
            f"{str(directory)!r} has no {ZERO_IMAGE_NAME}; rebuild it with FeatureWriter(zero_image=...) or add one "
            "with lambda_eclipse.features.write_zero_image(dir, encoders.zero_image_embedding(image_encoder)[0])"
        )
    vector = load_file(str(path))["zero_image"]
    if vector.shape != (index.dim,):
        raise UserError(f"{str(path)!r} holds a {tuple(vector.shape)} vector; the store's features are {index.dim}-d")
    return vector


def pack_strings(strings: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 encode and concatenate: returns (C,) uint8 bytes and (N+1,) int64 offsets."""
    encoded = [s.encode("utf-8") for s in strings]
    offsets = torch.zeros(len(encoded) + 1, dtype=torch.int64)
    if encoded:
        offsets[1:] = torch.tensor([len(e) for e in encoded], dtype=torch.int64).cumsum(0)
    data = (
        torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8)
        if offsets[-1]
        else torch.zeros(0, dtype=torch.uint8)
    )
    return data, offsets
