"""The λ binding: a prompt's subject words take their subject's CLIP image embedding in the text token states.

This module owns the binding for the whole project. The generation pipeline, the dataset builder and the prior
trainer all go through :func:`locate_subject_tokens` (which tokens belong to which subject word) and
:func:`bind_subjects` (the substitution itself), so training and inference cannot disagree.

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


def subject_token_index(
    spans: torch.Tensor, subject_mask: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """Turn per-subject token spans into a per-token subject index.

    Args:
        spans: (B, S, K, 2) or (B, S, 2) [start, end) token ranges; K occurrences per subject (padding: start=end).
        subject_mask: (B, S) bool, True for real subjects.
        seq_len: L, the token length of the states to bind.

    Returns:
        (B, L) long: the subject that owns each token, or -1.
    """
    if spans.dim() == 3:
        spans = spans.unsqueeze(2)
    positions = torch.arange(seq_len, device=spans.device)
    start, end = spans[..., 0, None], spans[..., 1, None]  # (B, S, K, 1)
    inside = (positions >= start) & (positions < end) & subject_mask[:, :, None, None].bool()  # (B, S, K, L)
    owned = inside.any(dim=2)  # (B, S, L)
    index = torch.full(owned.shape[::2], -1, dtype=torch.long, device=spans.device)  # (B, L)
    for s in range(owned.shape[1]):
        index = torch.where(owned[:, s], s, index)
    return index


def bind_subjects(
    token_states: torch.Tensor, subject_embeds: torch.Tensor, token_subject: torch.Tensor
) -> torch.Tensor:
    """The λ binding: replace every token of a subject word by that subject's CLIP image embedding.

    Args:
        token_states: (B, L, D) last-layer text token states.
        subject_embeds: (B, S, D) subject image embeddings (projected CLIP image embeddings).
        token_subject: (B, L) long, the subject index that owns each token, or -1 (see :func:`subject_token_index`).

    Returns:
        (B, L, D) interleaved token states; unbound tokens are unchanged.
    """
    if subject_embeds.shape[1] == 0:
        return token_states
    gathered = torch.gather(
        subject_embeds.to(token_states.dtype),
        1,
        token_subject.clamp(min=0)[..., None].expand(-1, -1, token_states.shape[-1]),
    )
    return torch.where((token_subject >= 0)[..., None], gathered, token_states)


def spans_tensor(located: list[SubjectTokens], words: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the spans of ``words`` for a batch of prompts: (B, S, K, 2) long spans and (B, S) bool subject mask."""
    most = max((len(t.spans.get(w, [])) for t in located for w in words), default=1)
    spans = torch.zeros(len(located), len(words), max(most, 1), 2, dtype=torch.long)
    mask = torch.zeros(len(located), len(words), dtype=torch.bool)
    for b, tokens in enumerate(located):
        for s, word in enumerate(words):
            for k, span in enumerate(tokens.spans.get(word, [])):
                spans[b, s, k] = torch.tensor(span)
                mask[b, s] = True
    return spans, mask


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
    words = list(located[0].spans)  # normalised spellings, in the order given
    spans, mask = spans_tensor(located, words)
    embeds = torch.stack(list(subjects.values()))  # (S, D)
    embeds = embeds.to(text.token_states)[None].expand(len(prompts), -1, -1)
    index = subject_token_index(spans.to(embeds.device), mask.to(embeds.device), text.token_states.shape[1])
    return InterleavedPrompt(bind_subjects(text.token_states, embeds, index), text.attention_mask, text.pooled)
