"""LambdaEclipsePipeline end to end on tiny components."""

import numpy as np
import pytest
import torch
from PIL import Image

from lambda_eclipse import LambdaEclipsePipeline, UserError
from tiny import tiny_pipeline


def picture(seed=0, size=40, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).convert(mode)


def run(pipe, seeds, **kw):
    kw.setdefault("num_inference_steps", 2)
    return pipe("a dog on the beach", subjects={"dog": picture()}, output_type="np",
                generator=[torch.Generator().manual_seed(s) for s in seeds], num_images_per_prompt=len(seeds), **kw)


def test_size_count_and_determinism(tiny_pipe):
    out = run(tiny_pipe, [1, 2], height=24, width=16)
    assert out.images.shape == (2, 24, 16, 3)
    assert out.image_embeds.shape == (2, 32) and out.negative_image_embeds.shape == (2, 32)
    again = run(tiny_pipe, [1, 2], height=24, width=16)
    assert np.array_equal(out.images, again.images)
    alone = run(tiny_pipe, [2], height=24, width=16)  # per-image seeds: image 2 of a batch == image alone
    assert np.abs(out.images[1] - alone.images[0]).max() < 1e-3  # batched vs single matmul rounding
    assert not np.allclose(out.images[0], out.images[1])


def test_pil_output_default_size_and_single_generator(tiny_pipe):
    out = tiny_pipe(["a dog", "a cat on the beach"], num_images_per_prompt=2, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), scheduler="ddim")
    assert len(out.images) == 4 and out.images[0].size == (16, 16)


def test_subjects_edge_and_embeddings_change_the_prior(tiny_pipe, tmp_path):
    def embeds(**kw):
        return tiny_pipe.prior_embeddings("a dog on the beach", generator=torch.Generator().manual_seed(0), **kw)

    text_only = embeds().image_embeds
    with_subject = embeds(subjects={"dog": picture(1)}).image_embeds
    with_edge = embeds(subjects={"dog": picture(1)}, edge_image=picture(2)).image_embeds
    assert not torch.allclose(text_only, with_subject) and not torch.allclose(with_subject, with_edge)
    # A saved subject embedding, an RGBA image composited on white, and a raw tensor all work.
    saved = tmp_path / "dog.safetensors"
    vector = tiny_pipe.save_subject_embedding("dog", picture(1), saved)
    assert torch.allclose(embeds(subjects={"dog": str(saved)}).image_embeds, with_subject)
    assert torch.allclose(embeds(subjects={"dog": vector}).image_embeds, with_subject)
    rgba = picture(1, mode="RGBA")
    assert torch.isfinite(embeds(subjects={"dog": rgba}).image_embeds).all()
    prior_only = tiny_pipe("a dog on the beach", output_type="embeds", generator=torch.Generator().manual_seed(0))
    assert prior_only.images is None and torch.allclose(prior_only.image_embeds, text_only)


def test_save_and_load_round_trip(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "model")
    loaded = LambdaEclipsePipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    # Loaded transformers models may pick another attention kernel: equal up to float rounding.
    assert np.abs(run(tiny_pipe, [3]).images - run(loaded, [3]).images).max() < 1e-4


def test_prior_only_folder_and_text_only_prior(tmp_path):
    pipe = tiny_pipeline(additional_embeddings=3)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a dog on the beach", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 16, 16, 3)
    with pytest.raises(UserError, match="text-only"):
        pipe("a dog", subjects={"dog": picture()})
    with pytest.raises(UserError, match="not a λ-ECLIPSE model folder"):
        LambdaEclipsePipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(height=18), "multiple of 4"),
        (dict(scheduler="euler"), "unknown scheduler"),
        (dict(subjects={"cat": "missing.png"}), "does not exist"),
        (dict(subjects={"cat": torch.zeros(7)}), "shape"),
        (dict(generator=[torch.Generator()] * 3), "generators"),
    ],
)
def test_call_errors(tiny_pipe, kwargs, message):
    with pytest.raises(UserError, match=message):
        tiny_pipe("a cat", **kwargs)
