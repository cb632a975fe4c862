"""LambdaEclipsePipeline end to end on tiny components, and check_inputs, the one place inputs are validated."""

import numpy as np
import pytest
import torch
from PIL import Image

from lambda_eclipse import LambdaEclipsePipeline, LambdaEclipsePriorOutput, UserError
from lambda_eclipse import pipeline as pipeline_module
from lambda_eclipse.pipeline import check_inputs
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

    first = embeds()
    assert type(first) is LambdaEclipsePriorOutput  # the pipeline's prior-only output
    text_only = first.image_embeds
    with_subject = embeds(subjects={"dog": picture(1)}).image_embeds
    with_edge = embeds(subjects={"dog": picture(1)}, edge_image=picture(2)).image_embeds
    assert not torch.allclose(text_only, with_subject) and not torch.allclose(with_subject, with_edge)
    # A saved subject embedding, an RGBA image composited on white, and a raw tensor all work.
    saved = tmp_path / "dog.safetensors"
    vector = tiny_pipe.save_subject_embedding("dog", picture(1), saved)
    assert [p.name for p in tmp_path.iterdir()] == ["dog.safetensors"]  # written atomically: no temporary left
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


# ------------------------------------------------------------------------------------------------ check_inputs
GOOD = dict(prompt="a dog on the beach", subjects={"dog": "dog.png"})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=7), "prompt must be a string"),
        (dict(prompt=[]), "no prompt given"),
        (dict(prompt=["a dog", None]), "every prompt must be a string"),
        (dict(prompt=" \t"), "prompt is empty"),
        (dict(prompt=["a dog", ""]), "prompt is empty"),
        (dict(subjects=["dog.png"]), "subjects must map"),
        (dict(subjects={3: "dog.png"}), "must be a string"),
        (dict(subjects={"!!": "dog.png"}), "is empty"),
        (dict(subjects={"Dog": "a.png", "dog!": "b.png"}), "'dog' is given twice"),
        (dict(subjects={"dog": 3.5}), "is a float"),
        (dict(subjects={"cat": "cat.png"}), "'cat' does not occur"),
        (dict(prompt=["a dog", "a cat"]), "'dog' does not occur in the prompt 'a cat'"),
        (dict(edge_image=5), "edge_image is a int"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
        (dict(guidance_scale=float("inf")), "guidance_scale"),
        (dict(guidance_scale="7"), "guidance_scale"),
        (dict(guidance_scale=True), "guidance_scale"),
        (dict(num_inference_steps=0), "num_inference_steps must be a positive whole number"),
        (dict(num_inference_steps=2.0), "num_inference_steps"),
        (dict(num_inference_steps=True), "num_inference_steps"),
        (dict(num_images_per_prompt=-1), "num_images_per_prompt"),
        (dict(num_images_per_prompt=False), "num_images_per_prompt"),
        (dict(height=0), "height must be a positive whole number of px"),
        (dict(width=16.0), "width"),
        (dict(height=True), "height"),
        (dict(scheduler="euler"), "unknown scheduler 'euler'; choose one of ddpm, ddim"),
        (dict(scheduler=["ddim"]), "unknown scheduler"),
        (dict(output_type="jpeg"), "unknown output_type"),
        (dict(generator=[torch.Generator()] * 3), "3 generators given for 1 images"),
        (dict(prompt=["a dog", "a dog"], num_images_per_prompt=2, generator=[torch.Generator()] * 3), "for 4 images"),
        (dict(generator=7), "torch.Generator"),
        (dict(generator=[torch.Generator(), 7]), "torch.Generator"),
    ],
)
def test_check_inputs_without_a_model(kwargs, message):
    with pytest.raises(UserError) as error:
        check_inputs(**{**GOOD, **kwargs})
    text = str(error.value)
    assert message in text and "\n" not in text


def test_check_inputs_accepts_good_inputs_and_leaves_model_checks_to_the_model(tiny_pipe):
    ok = dict(prompt=["a Dog! and a guinea-pig", "the guinea pig on the dog"],
              subjects={"dog": picture(), "Guinea Pig": torch.zeros(32)},
              edge_image=picture(), num_images_per_prompt=2, guidance_scale=np.float32(4),
              generator=[torch.Generator() for _ in range(4)], scheduler="ddim", output_type="np")
    check_inputs(**ok)  # no error
    check_inputs(**{**GOOD, "height": 18})  # the size step is the model's: not checked without one
    with pytest.raises(UserError, match="height must be a positive multiple of 4 px"):
        check_inputs(**{**GOOD, "height": 18}, pipeline=tiny_pipe)
    with pytest.raises(UserError, match="multiple of 4"):
        tiny_pipe.check_inputs("a cat", width=6)  # the method passes pipeline=self
    tiny_pipe.check_inputs("a cat", width=8, output_type="np")
    tiny_pipe.check_inputs("a cat", width=6, output_type="embeds")  # no decoder run, so no size step
    with pytest.raises(UserError, match="^--steps must be"):
        check_inputs("a cat", num_inference_steps=0, names={"num_inference_steps": "--steps"})


def test_check_inputs_model_dependent(tiny_pipe):
    text_only = tiny_pipeline(additional_embeddings=3)
    check_inputs("a dog", subjects={"dog": "dog.png"}, edge_image="edge.png")  # fine for some model
    with pytest.raises(UserError, match="subjects need a λ-ECLIPSE prior"):
        check_inputs("a dog", subjects={"dog": "dog.png"}, pipeline=text_only)
    with pytest.raises(UserError, match="edge map needs a λ-ECLIPSE prior"):
        text_only.prior_embeddings("a dog", edge_image=picture())
    prior_only = LambdaEclipsePipeline(**{**tiny_pipe.components, "unet": None, "scheduler": None, "movq": None})
    with pytest.raises(UserError, match="no decoder"):
        prior_only("a dog")
    assert prior_only("a dog", output_type="embeds").image_embeds.shape == (1, 32)


@pytest.mark.parametrize("entry", ["call", "prior_embeddings"])
def test_entry_points_check_inputs_first(tiny_pipe, monkeypatch, entry):
    calls = []
    original = pipeline_module.check_inputs

    def spy(*args, **kwargs):
        calls.append(("check", kwargs.get("pipeline")))
        return original(*args, **kwargs)

    def encode(*args, **kwargs):
        calls.append(("encode", None))
        raise AssertionError("a subject was encoded before the inputs were checked")

    monkeypatch.setattr(pipeline_module, "check_inputs", spy)
    monkeypatch.setattr(tiny_pipe, "encode_subject", encode)
    entry_point = tiny_pipe if entry == "call" else tiny_pipe.prior_embeddings
    with pytest.raises(UserError, match="num_images_per_prompt"):
        entry_point("a dog", subjects={"dog": picture()}, num_images_per_prompt=0)
    assert calls == [("check", tiny_pipe)]  # checked once, with the model, before any encoding
