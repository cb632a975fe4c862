"""The λ binding: a prompt's subject words take their subject's CLIP image embedding in the text token states.

This module owns the binding for the whole project, in three steps that the generation pipeline, the dataset
builder and the prior trainer share, so training and inference cannot disagree:

1. :func:`locate_subject_tokens`: which token ranges belong to which subject word (every occurrence).
2. :func:`subject_token_index`: those ranges as a per-token owner index, (L,) long, -1 for text tokens. The builder
   stores it in the feature store (``token_subject``); :func:`interleave_prompts` builds it at inference.
3. :func:`bind_subjects`: the substitution itself, from token states, subject embeddings and that index.

Differences from the released code, which matched BPE *ids* anywhere in the prompt: words are matched whole
(case-insensitive, punctuation-tolerant, multi-token and multi-word), every occurrence is bound, subjects may not
claim the same tokens, and a missing word is an error instead of a printed warning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import UserError


@dataclass
class SubjectTokens:
    """Where the subject words sit in one tokenized prompt.

    Attributes:
        input_ids: (L,) token ids with BOS/EOS, unpadded.
        spans: subject word -> list of [start, end) token ranges, one per occurrence, in prompt order.
    """

    input_ids: list[int]
    spans: dict[str, list[tuple[int, int]]]


def normalize_subject_word(word: str) -> str:
    """Lower-case, trim surrounding punctuation and collapse inner whitespace/hyphens ("Guinea-Pig!" -> "guinea pig")."""
    parts = [p for p in re.split(r"[\s\-_]+", word.strip().lower()) if p]
    parts = [re.sub(r"^\W+|\W+$", "", p) for p in parts]
    return " ".join(p for p in parts if p)


def _word_pattern(word: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in word.split(" ")]
    # Whole words only: not preceded or followed by a letter/digit; parts may be joined by spaces or hyphens.
    return re.compile(r"(?<![\w])" + r"[\s\-_]+".join(parts) + r"(?![\w])")


def locate_subject_tokens(tokenizer, prompt: str, words: list[str], max_length: int | None = None) -> SubjectTokens:
    """Find the token ranges of each subject word in ``prompt``.

    Args:
        tokenizer: a fast (tokenizers-backed) CLIP tokenizer; character offsets map words to tokens.
        prompt: the text prompt.
        words: subject words ("dog", "guinea pig"); matched whole and case-insensitively.
        max_length: the text encoder's context length (defaults to ``tokenizer.model_max_length``).

    Raises:
        UserError: empty or over-long prompt, a word absent from the prompt, a word given twice, or two subject
            words sharing tokens ("dog" and "hot dog").
    """
    if not prompt or not prompt.strip():
        raise UserError("the prompt is empty; give a text prompt such as 'a dog on the beach'")
    max_length = max_length or tokenizer.model_max_length
    encoded = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True, truncation=False)
    input_ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    if len(input_ids) > max_length:
        raise UserError(
            f"the prompt is {len(input_ids)} tokens long but the text encoder takes at most {max_length}; shorten it"
        )
    lowered = prompt.lower()
    spans: dict[str, list[tuple[int, int]]] = {}
    owner: dict[int, str] = {}
    for raw_word in words:
        word = normalize_subject_word(raw_word)
        if not word:
            raise UserError(f"subject word {raw_word!r} is empty; use WORD=IMAGE with a word from the prompt")
        if word in spans:
            raise UserError(f"subject word {word!r} is given twice; give each subject word once")
        found: list[tuple[int, int]] = []
        for match in _word_pattern(word).finditer(lowered):
            start, end = match.span()
            # Special tokens have empty (0, 0) offsets and never overlap a match.
            tokens = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
            if tokens:
                found.append((tokens[0], tokens[-1] + 1))
        if not found:
            raise UserError(f"subject word {word!r} does not occur in the prompt {prompt!r}; use a word of the prompt")
        for start, end in found:
            for i in range(start, end):
                if i in owner:
                    raise UserError(
                        f"subject words {owner[i]!r} and {word!r} cover the same prompt tokens; use distinct words"
                    )
                owner[i] = word
        spans[word] = found
    return SubjectTokens(input_ids=input_ids, spans=spans)


def subject_token_index(located: SubjectTokens, length: int | None = None) -> torch.Tensor:
    """The per-token form of the binding: which subject owns each token of a located prompt.

    Subjects are numbered in the order of ``located.spans`` (the order the words were given); every occurrence
    of a word is owned by its subject. The feature store keeps this index row for row with the token states, and
    :func:`interleave_prompts` builds the same index at inference, so both bind the same tokens.

    Args:
        located: the output of :func:`locate_subject_tokens`.
        length: tokens to cover (default: the prompt's real tokens, BOS..EOS); positions past the prompt are -1.

    Returns:
        (length,) long: the owning subject's index, or -1 for tokens that stay text.
    """
    length = len(located.input_ids) if length is None else length
    if length < len(located.input_ids):
        raise ValueError(f"length {length} is shorter than the prompt's {len(located.input_ids)} tokens")
    index = torch.full((length,), -1, dtype=torch.long)
    for s, spans in enumerate(located.spans.values()):
        for start, end in spans:
            index[start:end] = s
    return index


def bind_subjects(
    token_states: torch.Tensor, subject_embeds: torch.Tensor, token_subject: torch.Tensor
) -> torch.Tensor:
    """The λ binding: replace every token of a subject word by that subject's CLIP image embedding.

    Args:
        token_states: (B, L, D) last-layer text token states.
        subject_embeds: (B, S, D) subject image embeddings (projected CLIP image embeddings).
        token_subject: (B, L) integer, the subject index that owns each token, or -1
            (see :func:`subject_token_index`; the feature store's ``token_subject``).

    Returns:
        (B, L, D) interleaved token states; unbound tokens are unchanged.
    """
    if subject_embeds.shape[1] == 0:
        return token_states
    token_subject = token_subject.to(device=token_states.device, dtype=torch.long)
    gathered = torch.gather(
        subject_embeds.to(token_states.dtype),
        1,
        token_subject.clamp(min=0)[..., None].expand(-1, -1, token_states.shape[-1]),
    )
    return torch.where((token_subject >= 0)[..., None], gathered, token_states)


@dataclass
class InterleavedPrompt:
    """Prior inputs for a batch of prompts.

    Attributes:
        token_states: (B, L, D) text token states with subject tokens replaced by subject image embeddings.
        attention_mask: (B, L) bool, True for real tokens.
        pooled_text: (B, D) projected pooled embedding of the *unmodified* prompt (stays text-only).
    """

    token_states: torch.Tensor
    attention_mask: torch.Tensor
    pooled_text: torch.Tensor


def interleave_prompts(tokenizer, text_encoder, prompts: list[str], subjects: dict[str, torch.Tensor]) -> InterleavedPrompt:
    """Encode prompts and bind subjects: ``subjects`` maps a word to its (D,) image embedding, shared by all prompts.

    Every prompt must contain every subject word (see :func:`locate_subject_tokens` for the rules).
    """
    from .encoders import encode_text, text_context_length

    length = text_context_length(tokenizer, text_encoder)
    words = list(subjects)
    located = [locate_subject_tokens(tokenizer, p, words, length) for p in prompts]
    text = encode_text(tokenizer, text_encoder, prompts)
    if not words:
        return InterleavedPrompt(text.token_states, text.attention_mask, text.pooled)
    padded = text.token_states.shape[1]
    index = torch.stack([subject_token_index(t, padded) for t in located]).to(text.token_states.device)  # (B, L)
    embeds = torch.stack(list(subjects.values()))  # (S, D), in the order of the words, as the index numbers them
    embeds = embeds.to(text.token_states)[None].expand(len(prompts), -1, -1)
    return InterleavedPrompt(bind_subjects(text.token_states, embeds, index), text.attention_mask, text.pooled)
