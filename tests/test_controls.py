"""The diffusers-style generation API: supplied embeddings, latents, callbacks, subject scale, several pictures per
subject, edge maps and img2img, on tiny components."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lambda_eclipse import UserError
from lambda_eclipse.interpolation import normalized_mean

PROMPT = "a dog wearing a hat on the beach"


def picture(seed=0, size=40, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).convert(mode)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def call(pipe, seed=0, **kw):
    kw.setdefault("num_inference_steps", 2)
    kw.setdefault("output_type", "np")
    return pipe(generator=gen(seed), **kw)


def test_supplied_embeddings_decode_as_the_plain_call(tiny_pipe):
    plain = call(tiny_pipe, prompt=PROMPT, subjects={"dog": picture(1)})
    # The plain call draws the prior's (1, D) noise from the generator before the decoder's: advance it alike.
    advanced = gen(0)
    torch.randn(1, 32, generator=advanced)
    again = tiny_pipe(image_embeds=plain.image_embeds, negative_image_embeds=plain.negative_image_embeds,
                      generator=advanced, num_inference_steps=2, output_type="np")
    assert np.array_equal(plain.images, again.images)
    # With fixed latents and a deterministic scheduler the generator plays no part.
    latents = torch.randn(1, 4, 8, 8, generator=gen(8))
    ddim = call(tiny_pipe, prompt=PROMPT, latents=latents, scheduler="ddim")
    bare = call(tiny_pipe, 9, image_embeds=ddim.image_embeds[0], latents=latents, scheduler="ddim")  # (D,), default negative
    assert np.array_equal(ddim.images, bare.images)
    unadvanced = call(tiny_pipe, image_embeds=plain.image_embeds)
    assert not np.array_equal(unadvanced.images, plain.images)
    embeds_only = tiny_pipe(image_embeds=plain.image_embeds, output_type="embeds")
    assert torch.equal(embeds_only.image_embeds, plain.image_embeds)


def test_latents_callbacks_and_return_dict(tiny_pipe):
    latents = torch.randn(1, 4, 8, 8, generator=gen(5))
    seen = []

    def on_step(pipe, step, timestep, tensors):
        seen.append((step, tuple(tensors)))
        return {"latents": tensors["latents"]}

    first = call(tiny_pipe, 1, prompt=PROMPT, latents=latents, callback_on_step_end=on_step,
                 callback_on_step_end_tensor_inputs=["latents", "image_embeds"], num_inference_steps=3)
    assert [s for s, _ in seen] == [0, 1, 2] and seen[0][1] == ("latents", "image_embeds")
    second = call(tiny_pipe, 1, prompt=PROMPT, latents=latents, num_inference_steps=3)
    other = call(tiny_pipe, 1, prompt=PROMPT, latents=latents + 1, num_inference_steps=3)
    assert np.array_equal(first.images, second.images) and not np.allclose(first.images, other.images)

    def zero_latents(pipe, step, timestep, tensors):  # a callback's returned tensors are used
        return {"latents": torch.zeros_like(tensors["latents"])}

    zeroed = call(tiny_pipe, 1, prompt=PROMPT, latents=latents, num_inference_steps=1, callback_on_step_end=zero_latents)
    blank = tiny_pipe.movq.decode(torch.zeros(1, 4, 8, 8), force_not_quantize=True).sample.detach()
    assert np.allclose(zeroed.images[0], (blank[0].permute(1, 2, 0).numpy() * 0.5 + 0.5).clip(0, 1), atol=1e-5)
    images, embeds, negative = tiny_pipe(PROMPT, num_inference_steps=1, output_type="pt", return_dict=False)
    assert images.shape == (1, 3, 16, 16) and embeds.shape == negative.shape == (1, 32)
    latent = call(tiny_pipe, prompt=PROMPT, output_type="latent")
    assert tuple(latent.images.shape) == (1, 4, 8, 8)


def test_subject_scale(tiny_pipe):
    subjects = {"dog": picture(1), "hat": picture(2)}

    def embeds(**kw):
        return tiny_pipe.prior_embeddings(PROMPT, generator=gen(3), **kw).image_embeds

    text = embeds()
    full = embeds(subjects=subjects)
    assert torch.equal(embeds(subjects=subjects, subject_scale=0.0), text)  # 0 = the text-only call, exactly
    assert torch.equal(embeds(subjects=subjects, subject_scale=1.0), full)  # 1 = the paper's behaviour
    half = embeds(subjects=subjects, subject_scale=0.5)
    cos = lambda a, b: float(F.cosine_similarity(a, b).item())  # noqa: E731
    assert cos(half, text) == pytest.approx(cos(half, full), abs=1e-4)  # the middle of the arc
    assert abs(half.norm() - (text.norm() + full.norm()) / 2) < 1e-4
    # per subject: dog at 1 and hat at 0 is the dog bound alone
    dog_only = embeds(subjects={"dog": subjects["dog"]})
    mixed = embeds(subjects=subjects, subject_scale={"dog": 1.0, "hat": 0.0})
    assert torch.allclose(mixed, dog_only, atol=1e-5) and not torch.allclose(mixed, full, atol=1e-3)
    uniform = embeds(subjects=subjects, subject_scale={"Dog": 0.5, "hat": 0.5})
    assert torch.allclose(uniform, half, atol=1e-6)
    beyond = embeds(subjects=subjects, subject_scale=2.0)  # extrapolates past the subject-bound prediction
    assert cos(beyond, text) < cos(full, text)


def test_several_pictures_are_the_normalized_mean(tiny_pipe):
    pictures = [picture(1), picture(2, size=64, mode="L"), picture(3, size=24, mode="RGBA"), picture(4, mode="P")]
    single = [tiny_pipe.encode_subject(p, "dog") for p in pictures]
    combined = tiny_pipe.encode_subject(pictures, "dog")
    units = torch.stack([F.normalize(e, dim=0) for e in single]).mean(0)
    expected = F.normalize(units, dim=0) * torch.stack([e.norm() for e in single]).mean()
    assert torch.allclose(combined, expected, atol=1e-6) and torch.allclose(normalized_mean(torch.stack(single)), expected)
    assert torch.equal(tiny_pipe.encode_subject([pictures[0]], "dog"), single[0])  # a list of one = the image
    a = tiny_pipe.prior_embeddings(PROMPT, {"dog": pictures}, generator=gen(0)).image_embeds
    b = tiny_pipe.prior_embeddings(PROMPT, {"dog": combined}, generator=gen(0)).image_embeds
    assert torch.allclose(a, b, atol=1e-6)


def test_edge_map_as_is_canny_thresholds_and_strength(tiny_pipe):
    from lambda_eclipse.encoders import canny_edges, edge_embedding

    photo = picture(7, size=8).resize((64, 64), Image.BILINEAR)  # smooth: the thresholds decide which edges show
    assert not np.array_equal(np.asarray(canny_edges(photo, 10, 50)), np.asarray(canny_edges(photo)))

    def embeds(**kw):
        return tiny_pipe.prior_embeddings(PROMPT, generator=gen(0), **kw).image_embeds

    canny = embeds(edge_image=photo)
    as_map = embeds(edge_image=canny_edges(photo), edge_is_map=True)
    assert torch.allclose(canny, as_map, atol=1e-6)  # a ready map used as is equals the Canny of the photo
    assert not torch.equal(embeds(edge_image=canny_edges(photo)), canny)  # Canny'd twice differs
    assert not torch.equal(embeds(edge_image=photo, canny_low=10, canny_high=50), canny)
    assert torch.allclose(embeds(edge_image=photo, edge_strength=0.0), embeds(), atol=1e-5)  # 0 = no edge
    for mode in ("L", "1", "RGBA", "P"):
        edge = edge_embedding(tiny_pipe.image_processor, tiny_pipe.image_encoder, canny_edges(photo).convert(mode),
                              is_map=True)
        assert torch.isfinite(edge).all()


def test_img2img_shares_the_components(tiny_pipe, monkeypatch):
    from diffusers import KandinskyV22Img2ImgPipeline

    built = []
    original = KandinskyV22Img2ImgPipeline.__init__

    def spy(self, unet, scheduler, movq):
        built.append((unet, movq))
        original(self, unet=unet, scheduler=scheduler, movq=movq)

    monkeypatch.setattr(KandinskyV22Img2ImgPipeline, "__init__", spy)
    steps = []

    def count(pipe, step, timestep, tensors):
        steps.append(int(timestep))
        return {}

    init = picture(9, size=16)
    out = call(tiny_pipe, 4, prompt=PROMPT, init_image=init, strength=0.5, num_inference_steps=4,
               callback_on_step_end=count)
    assert built[0][0] is tiny_pipe.unet and built[0][1] is tiny_pipe.movq  # no second copy of the weights
    assert len(steps) == 2  # int(4 · 0.5) denoising steps, from the middle of the schedule
    again = call(tiny_pipe, 4, prompt=PROMPT, init_image=init, strength=0.5, num_inference_steps=4)
    other = call(tiny_pipe, 4, prompt=PROMPT, init_image=picture(10, size=16), strength=0.5, num_inference_steps=4)
    assert np.array_equal(out.images, again.images) and not np.allclose(out.images, other.images)
    text2image = call(tiny_pipe, 4, prompt=PROMPT, num_inference_steps=4)
    full = call(tiny_pipe, 4, prompt=PROMPT, init_image=init, strength=1.0, num_inference_steps=4)
    # diffusers' img2img at strength 1 still keeps sqrt(ᾱ_t) of the image at the first step, and draws the MoVQ
    # sample from the generator first: not bitwise text-to-image, but every step runs.
    assert full.images.shape == text2image.images.shape


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_embeds=torch.zeros(1, 7)), "dimension 7"),
        (dict(image_embeds=torch.zeros(2, 32), negative_image_embeds=torch.zeros(3, 32)), "3 negative_image_embeds"),
        (dict(image_embeds=torch.full((1, 32), float("nan"))), "NaN"),
        (dict(image_embeds=torch.zeros(1, 32), prompt="a dog"), "drop the prompt"),
        (dict(negative_image_embeds=torch.zeros(1, 32), prompt="a dog"), "without image_embeds"),
        (dict(), "prompt must be a string"),
        (dict(prompt="a dog", subject_scale=2.5), "subject_scale must be a number in [0, 2]"),
        (dict(prompt="a dog", subject_scale=float("nan")), "subject_scale"),
        (dict(prompt="a dog", subjects={"dog": "d.png"}, subject_scale={"cat": 1.0}), "'cat', which is not a subject"),
        (dict(prompt="a dog", strength=0.0, init_image="x.png"), "strength must be a number in (0, 1]"),
        (dict(prompt="a dog", strength=1.5), "strength"),
        (dict(prompt="a dog", edge_strength=-1), "edge_strength"),
        (dict(prompt="a dog", canny_low=200, canny_high=100), "give low <= high"),
        (dict(prompt="a dog", latents=torch.zeros(4, 4)), "latents must be"),
        (dict(prompt="a dog", latents=torch.zeros(1, 4, 4, 4), init_image="x.png"), "exclude each other"),
        (dict(prompt="a dog", callback_on_step_end_tensor_inputs=["noise"]), "choose among"),
        (dict(prompt="a dog", subjects={"dog": ["a.png", 3]}), "is a int"),
    ],
)
def test_bad_controls_are_one_line(tiny_pipe, kwargs, message):
    with pytest.raises(UserError) as error:
        tiny_pipe(num_inference_steps=1, **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)
