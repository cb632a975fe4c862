"""The λ binding: which tokens a subject word owns, and the substitution itself."""

import pytest
import torch

from lambda_eclipse import UserError, bind_subjects, interleave_prompts, locate_subject_tokens, subject_token_index
from lambda_eclipse.conditioning import normalize_subject_word
from tiny import tiny_tokenizer

TOK = tiny_tokenizer()


def tokens_of(prompt, words):
    located = locate_subject_tokens(TOK, prompt, words)
    names = TOK.convert_ids_to_tokens(located.input_ids)
    return {w: ["".join(names[a:b]) for a, b in spans] for w, spans in located.spans.items()}


def test_whole_word_case_and_punctuation():
    assert tokens_of("A photo of a Dog, on the beach", ["dog"]) == {"dog": ["dog</w>"]}
    with pytest.raises(UserError, match="does not occur"):
        locate_subject_tokens(TOK, "a dogma on the beach", ["dog"])  # no partial-word match


def test_every_occurrence_and_multi_token_words():
    assert tokens_of("a dog and a dog", ["dog"]) == {"dog": ["dog</w>", "dog</w>"]}
    # "zebra" is not in the tiny vocabulary: five character tokens, all bound.
    assert tokens_of("a zebra on the beach", ["Zebra"]) == {"zebra": ["zebra</w>"]}
    assert len(locate_subject_tokens(TOK, "a zebra", ["zebra"]).spans["zebra"][0]) == 2
    assert tokens_of("a guinea pig wearing a hat", ["guinea pig", "hat"]) == {
        "guinea pig": ["guinea</w>pig</w>"], "hat": ["hat</w>"]}
    assert tokens_of("a guinea-pig", ["guinea pig"]) == {"guinea pig": ["guinea</w>-</w>pig</w>"]}
    assert normalize_subject_word("  Guinea-Pig! ") == "guinea pig"


@pytest.mark.parametrize(
    "prompt, words, message",
    [
        ("a dog", ["cat"], "does not occur"),
        ("a hot dog", ["dog", "hot dog"], "same prompt tokens"),
        ("a dog", ["dog", "Dog"], "given twice"),
        ("   ", ["dog"], "prompt is empty"),
        ("a " * 80, [], "at most 77"),
    ],
)
def test_binding_errors(prompt, words, message):
    with pytest.raises(UserError, match=message):
        locate_subject_tokens(TOK, prompt, words)


def test_bind_replaces_exactly_the_subject_tokens():
    states = torch.randn(2, 6, 4)
    subjects = torch.randn(2, 2, 4)
    index = torch.tensor([[-1, 0, 0, -1, 1, -1], [-1, -1, 0, -1, -1, -1]])
    bound = bind_subjects(states, subjects, index)
    expected = states.clone()
    expected[0, 1] = expected[0, 2] = subjects[0, 0]
    expected[0, 4] = subjects[0, 1]
    expected[1, 2] = subjects[1, 0]
    assert torch.equal(bound, expected)


def test_token_index_owns_every_occurrence():
    located = locate_subject_tokens(TOK, "a dog and a dog on a cat", ["dog", "cat"])
    assert len(located.spans["dog"]) == 2
    index = subject_token_index(located, 12)
    assert index.shape == (12,) and (index[len(located.input_ids):] == -1).all()  # past the prompt: text
    for s, word in enumerate(["dog", "cat"]):
        owned = [i for i, o in enumerate(index.tolist()) if o == s]
        assert owned == [i for a, b in located.spans[word] for i in range(a, b)]
    with pytest.raises(ValueError, match="shorter"):
        subject_token_index(located, 3)


def test_interleave_keeps_pooled_text_only(tiny_pipe):
    subject = torch.randn(32)
    plain = interleave_prompts(tiny_pipe.tokenizer, tiny_pipe.text_encoder, ["a dog on the beach"], {})
    bound = interleave_prompts(tiny_pipe.tokenizer, tiny_pipe.text_encoder, ["a dog on the beach"], {"dog": subject})
    assert torch.equal(plain.pooled_text, bound.pooled_text)
    assert torch.equal(bound.token_states[0, 2], subject)  # BOS, "a", "dog"
    changed = (plain.token_states != bound.token_states).any(-1)[0]
    assert changed.nonzero().flatten().tolist() == [2]
    assert bound.attention_mask.shape == (1, 77) and bound.attention_mask.sum() == 7  # BOS + 5 words + EOS
