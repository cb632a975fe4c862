"""Memory modes (lambda_eclipse.memory): the choice from free memory, the prior-then-decoder stage swap, refusals."""

import pytest
import torch

from lambda_eclipse.cli import build_parser, load_pipeline
from lambda_eclipse.errors import UserError
from lambda_eclipse.memory import choose_memory_mode, component_weight_bytes, mode_needs

GB = 10**9
# Full-size parameter counts (FACTS.md §1) in fp16 bytes.
FULL_FP16 = {"text_encoder": 694.7e6 * 2, "image_encoder": 1844.9e6 * 2, "prior": 34.8e6 * 2, "unet": 1253.1e6 * 2,
             "movq": 67.8e6 * 2}


@pytest.fixture(scope="module")
def saved(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_pipe.save_pretrained(folder)
    return str(folder)


def test_auto_picks_the_fastest_mode_that_fits_the_card():
    needs = mode_needs(FULL_FP16)
    assert needs["resident"] == pytest.approx(7.79e9, rel=1e-3)
    assert needs["prior-then-decoder"] == pytest.approx(5.15e9, rel=1e-3)  # encoders + prior > UNet + MoVQ
    assert needs["model"] == FULL_FP16["image_encoder"]
    picks = {card: choose_memory_mode(FULL_FP16, card * GB, "cuda") for card in (24, 8, 6, 4)}
    assert picks == {24: "resident", 8: "prior-then-decoder", 6: "model", 4: "sequential"}
    # on a CPU only the modes that change RAM are candidates
    assert choose_memory_mode(FULL_FP16, 4 * GB, "cpu") == "prior-then-decoder"
    assert choose_memory_mode(FULL_FP16, 24 * GB, "cpu") == "resident"


def test_weight_bytes_come_from_the_configs(saved, tiny_pipe):
    sizes = component_weight_bytes(saved, torch.float16)
    for name in ("text_encoder", "image_encoder", "prior", "unet", "movq"):
        assert sizes[name] == 2 * sum(p.numel() for p in getattr(tiny_pipe, name).parameters()), name


def test_prior_then_decoder_frees_the_encoders_and_draws_the_same_images(saved, tiny_pipe):
    call = dict(num_inference_steps=2, output_type="np")
    reference = tiny_pipe("a dog", generator=torch.Generator().manual_seed(0), **call).images
    pipe = load_pipeline(saved, "cpu", low_memory="prior-then-decoder")
    assert next(pipe.unet.parameters()).device.type == "meta"  # the decoder is not loaded before the prior ran
    images = pipe("a dog", generator=torch.Generator().manual_seed(0), **call).images
    assert pipe.text_encoder is None and pipe.image_encoder is None and pipe.prior is None
    assert next(pipe.unet.parameters()).device.type == "cpu"
    assert abs(images - reference).max() < 1e-4  # the saved copy of the same weights, same seed


def test_offload_modes_are_refused_on_a_cpu_and_unknown_modes_everywhere(saved):
    for mode in ("model", "sequential"):
        with pytest.raises(UserError, match="frees nothing on a CPU"):
            load_pipeline(saved, "cpu", low_memory=mode)
    with pytest.raises(UserError, match="unknown memory mode"):
        load_pipeline(saved, "cpu", low_memory="tiny")


def test_the_flag():
    parse = build_parser().parse_args
    assert parse(["generate", "a dog"]).low_memory is False
    assert parse(["generate", "a dog", "--low-memory"]).low_memory == "auto"
    assert parse(["generate", "a dog", "--low-memory", "prior-then-decoder"]).low_memory == "prior-then-decoder"
