"""The procedural miniature world: determinism, captions, masks, crops, splits and the word tokenizer."""

from __future__ import annotations


import numpy as np
import pytest
from transformers import CLIPTokenizer

from lambda_eclipse.miniworld.scenes import RESERVED_INSTANCES, render_scene, sample_scenes
from lambda_eclipse.miniworld.vocab import (
    BG_COLOURS,
    BG_KINDS,
    COLOURS,
    HELDOUT_TEMPLATES,
    SHAPES,
    TEXTURES,
    TRAIN_TEMPLATES,
    build_word_tokenizer,
    caption_vocabulary,
    miniworld_tokenizer,
)


@pytest.mark.parametrize("size", [32, 64])
def test_same_seed_same_bytes(size: int) -> None:
    a, b = render_scene(7, size), render_scene(7, size)
    assert a.image.shape == (size, size, 3) and a.image.dtype == np.uint8
    assert a.image.tobytes() == b.image.tobytes()
    assert a.captions == b.captions
    assert all(x.crop.tobytes() == y.crop.tobytes() for x, y in zip(a.objects, b.objects))
    assert render_scene(8, size).image.tobytes() != a.image.tobytes()


def test_layout_does_not_depend_on_resolution() -> None:
    small, large = render_scene(11, 32), render_scene(11, 64)
    assert small.captions == large.captions and small.labels()["relations"] == large.labels()["relations"]


def test_scene_contents_are_consistent() -> None:
    for scene in sample_scenes(200, seed=3, size=32):
        assert 1 <= len(scene.objects) <= 3
        assert len({o.shape for o in scene.objects}) == len(scene.objects)  # nouns bind unambiguously
        assert scene.background_colour in BG_COLOURS and scene.background_kind in BG_KINDS
        assert len(scene.relations) == len(scene.objects) - 1
        union = np.zeros((32, 32), dtype=bool)
        for obj in scene.objects:
            assert obj.shape in SHAPES and obj.colour in COLOURS and obj.texture in TEXTURES
            assert obj.mask.shape == (32, 32) and obj.mask.dtype == bool and obj.mask.sum() > 10
            assert not (union & obj.mask).any()  # objects never overlap
            union |= obj.mask
            x0, y0, x1, y1 = obj.box
            assert obj.mask[y0:y1, x0:x1].sum() == obj.mask.sum()
            assert obj.crop.shape == (32, 32, 3)
            assert (obj.crop[0, 0] == 255).all() or (obj.crop[-1, -1] == 255).all() or obj.shape == "box"
        for kind in ("full", "appearance_free"):
            caption = scene.captions[kind]
            assert [caption[s:e] for s, e in scene.noun_spans[kind]] == scene.nouns
        free = scene.captions["appearance_free"]
        appearance_words = list(COLOURS) + [t for t in TEXTURES if t != "plain"] + ["small", "large"]
        assert not any(w in free.split() for w in appearance_words)  # "plain" may name the background
        for obj in scene.objects:
            assert obj.colour in scene.captions["full"]


def test_crop_is_the_object_on_white() -> None:
    scene = render_scene(5, 32, crop_size=48)
    obj = scene.objects[0]
    assert obj.crop.shape == (48, 48, 3)
    # the object's own colour dominates the non-white crop pixels
    rgb = np.asarray(COLOURS[obj.colour], dtype=float)
    non_white = obj.crop.reshape(-1, 3)[(obj.crop.reshape(-1, 3) < 250).any(1)].astype(float)
    assert len(non_white) > 0.2 * 48 * 48
    if obj.texture == "plain":
        assert np.abs(np.median(non_white, axis=0) - rgb).max() < 30


def test_heldout_split_uses_reserved_instances_and_templates() -> None:
    train = sample_scenes(300, seed=1, size=32, split="train")
    held = sample_scenes(100, seed=1, size=32, split="heldout")
    assert 15 <= len(RESERVED_INSTANCES) <= 40
    assert not any(o.heldout for s in train for o in s.objects)
    assert all(any(o.heldout for o in s.objects) for s in held)
    assert all(s.template < len(TRAIN_TEMPLATES) for s in train)
    assert all(s.template >= len(TRAIN_TEMPLATES) for s in held)
    assert len({s.template for s in held}) == len(HELDOUT_TEMPLATES)


def test_every_caption_word_is_one_token(tmp_path) -> None:
    tok = miniworld_tokenizer(32)
    for word in caption_vocabulary():
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1 and tok.pad_token_id == 1
    scene = render_scene(3, 32)
    caption = scene.captions["full"]
    enc = tok(caption, padding="max_length", max_length=32, return_offsets_mapping=True)
    assert len(enc["input_ids"]) == 32
    assert enc["input_ids"][len(caption.split()) + 1] == tok.eos_token_id
    words = [caption[s:e] for s, e in enc["offset_mapping"] if e > s]
    assert words == caption.split()
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again(caption)["input_ids"] == tok(caption)["input_ids"]


def test_unknown_words_fall_back_to_characters() -> None:
    tok = build_word_tokenizer(["ball", "balloon", "all", "tall", "star"], model_max_length=16)
    for w in ["ball", "balloon", "all", "tall", "star"]:
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1
    ids = tok("zebra!", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1 and tok.unk_token_id not in ids
    assert tok.decode(ids) == "zebra !"  # CLIP splits punctuation off as its own word


def test_colour_mix_paints_between_palette_colours_and_changes_nothing_else() -> None:
    from lambda_eclipse.miniworld.scenes import scene_seed
    from lambda_eclipse.miniworld.vocab import COLOURS

    changed = 0
    for i in range(40):
        plain, mixed = render_scene(scene_seed(5, i), 32), render_scene(scene_seed(5, i), 32, colour_mix=1.0)
        assert np.array_equal(plain.image, render_scene(scene_seed(5, i), 32, colour_mix=0.0).image)
        assert plain.captions == mixed.captions and [o.box for o in plain.objects] == [o.box for o in mixed.objects]
        for a, b in zip(plain.objects, mixed.objects):
            interior = (a.crop.astype(int) == COLOURS[a.colour]).all(-1)  # the crop's pixels fully inside a plain object
            if a.texture != "plain" or interior.sum() < 4:
                continue
            rgb, own = b.crop[interior].astype(float).mean(0), np.asarray(COLOURS[a.colour], float)
            # on a segment from its own palette colour towards another one, less than half way
            fits = []
            for c, v in COLOURS.items():
                direction = np.asarray(v, float) - own
                w = float((rgb - own) @ direction / (direction @ direction)) if c != a.colour else 0.0
                fits.append((np.abs(own + w * direction - rgb).max(), w))
            residual, weight = min(fits)
            assert residual < 1.0 and 0.0 < weight < 0.5, (i, a.colour, rgb)
            changed += 1
    assert changed >= 10


def test_recolour_paints_one_object_and_keeps_the_labels() -> None:
    from lambda_eclipse.miniworld.scenes import scene_seed

    scene = render_scene(scene_seed(2, 0), 32)
    other = render_scene(scene_seed(2, 0), 32, recolour={0: (10.0, 200.0, 10.0)})
    assert scene.captions == other.captions and scene.objects[0].colour == other.objects[0].colour
    changed = np.any(scene.image != other.image, axis=-1)
    x0, y0, x1, y1 = scene.objects[0].box
    inside = np.zeros_like(changed)
    inside[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = True  # its box, and the anti-aliased rim around it
    assert changed.any() and not changed[~inside].any()  # only the first object's pixels change
