"""One binding: a caption that repeats a subject word is bound the same way by the dataset builder (what it stores),
the trainer (what it feeds the prior) and the pipeline (what generation feeds the prior)."""

from __future__ import annotations

import torch
from PIL import Image

from lambda_eclipse.conditioning import interleave_prompts, locate_subject_tokens
from lambda_eclipse.dataset import CaptionedImage, ClipEncoders, encode_records
from lambda_eclipse.encoders import encode_images, encode_text
from lambda_eclipse.features import FeatureDataset, FeatureWriter, collate_features
from lambda_eclipse.train.step import interleaved_prior_inputs

CAPTION = "a dog and a cat on the beach, the dog wearing a hat"  # "dog" twice


def _picture(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(40, 40, 3, generator=g) * 255).byte().numpy())


def test_repeated_word_is_bound_alike_in_builder_trainer_and_pipeline(tiny_pipe, tmp_path):
    words = ["dog", "cat"]
    crops = [_picture(1), _picture(2)]
    located = locate_subject_tokens(tiny_pipe.tokenizer, CAPTION, words)
    assert len(located.spans["dog"]) == 2  # the premise: the word occurs twice
    dog_tokens = [i for a, b in located.spans["dog"] for i in range(a, b)]
    cat_tokens = [i for a, b in located.spans["cat"] for i in range(a, b)]

    # builder -> store
    encoders = ClipEncoders.from_pipeline(tiny_pipe)
    record = CaptionedImage(image=_picture(3), caption=CAPTION, subjects=list(zip(words, crops)), source_id="r0",
                            with_edge=False)
    (sample,) = encode_records(encoders, [record])
    with FeatureWriter(tmp_path / "store", dim=32, max_text_len=77, zero_image=torch.zeros(32)) as writer:
        writer.add(sample)
    stored = FeatureDataset(tmp_path / "store")[0]
    owner = stored.token_subject.tolist()
    assert [i for i, o in enumerate(owner) if o == 0] == dog_tokens  # both occurrences, not only the first
    assert [i for i, o in enumerate(owner) if o == 1] == cat_tokens

    # trainer: the stored sample through collate and the step's input builder
    batch = collate_features([stored])
    trained = interleaved_prior_inputs(batch, torch.zeros(32), torch.Generator())["encoder_hidden_states"][0]

    # pipeline: the same caption and subject embeddings through the inference binding
    subjects = encode_images(tiny_pipe.image_processor, tiny_pipe.image_encoder, crops)
    inferred = interleave_prompts(tiny_pipe.tokenizer, tiny_pipe.text_encoder, [CAPTION], dict(zip(words, subjects)))
    length = stored.num_tokens
    torch.testing.assert_close(trained, inferred.token_states[0, :length], atol=2e-3, rtol=1e-3)  # fp16 storage

    plain = encode_text(tiny_pipe.tokenizer, tiny_pipe.text_encoder, [CAPTION]).token_states[0, :length]
    changed = (trained - plain).abs().amax(-1) > 1e-2
    assert changed.nonzero().flatten().tolist() == sorted(dog_tokens + cat_tokens)
    for i in dog_tokens:  # each occurrence carries the dog's picture
        torch.testing.assert_close(trained[i], subjects[0], atol=2e-3, rtol=1e-3)


def test_dropping_a_subject_unbinds_all_its_occurrences(tiny_pipe, tmp_path):
    encoders = ClipEncoders.from_pipeline(tiny_pipe)
    record = CaptionedImage(image=_picture(3), caption=CAPTION, subjects=[("dog", _picture(1))], source_id="r0",
                            with_edge=False)
    (sample,) = encode_records(encoders, [record])
    batch = collate_features([sample])
    kept = interleaved_prior_inputs(batch, torch.zeros(32), torch.Generator().manual_seed(0))
    dropped = interleaved_prior_inputs(batch, torch.zeros(32), torch.Generator().manual_seed(0), subject_drop_prob=1.0)
    assert not torch.equal(kept["encoder_hidden_states"], batch["token_states"])
    assert torch.equal(dropped["encoder_hidden_states"], batch["token_states"])  # every occurrence stays text


def test_subject_drop_is_per_subject_and_keeps_the_draw_order():
    # Two samples whose subjects each own two separate tokens (a repeated word); B=2, L=8, S=3, D=4.
    token_subject = torch.tensor([[-1, 0, -1, 1, 0, 2, 1, -1], [-1, 1, 0, -1, 1, 0, -1, -1]])
    states = torch.randn(2, 8, 4)
    batch = dict(
        token_states=states, attention_mask=torch.ones(2, 8, dtype=torch.bool), token_subject=token_subject,
        pooled_text=torch.randn(2, 4), subject_embeds=torch.randn(2, 3, 4) + 10,  # far from every text state
        subject_mask=torch.tensor([[True, True, True], [True, True, False]]), edge=torch.randn(2, 4),
        has_edge=torch.tensor([True, True]),
    )
    patterns = set()
    for seed in range(16):
        out = interleaved_prior_inputs(batch, torch.zeros(4), torch.Generator().manual_seed(seed), 0.5, 0.5)
        # The same draws, in the documented order: noise, keep_subject, keep_edge.
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(2, 4, generator=g)
        keep, keep_edge = torch.rand(2, 3, generator=g) >= 0.5, torch.rand(2, generator=g) >= 0.5
        assert torch.equal(out["hidden_states"], noise)
        assert torch.equal(out["control_embedding"], torch.where(keep_edge[:, None], batch["edge"], torch.zeros(4)))
        bound = (out["encoder_hidden_states"] != states).any(-1)  # (B, L)
        for b in range(2):
            for s in range(3):
                owned = token_subject[b] == s
                if owned.any():  # every occurrence of a subject is bound together, or none is
                    assert bound[b][owned].tolist() == [bool(keep[b, s])] * int(owned.sum())
        assert not bound[token_subject < 0].any()
        patterns.add(tuple(keep[0].tolist()))
    assert len(patterns) > 2  # the seeds exercised kept, dropped and mixed subjects
