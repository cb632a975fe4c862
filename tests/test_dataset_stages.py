"""Each dataset-builder stage on its own: tiny models, crafted filter cases, inputs of every kind and defect."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lambda_eclipse.dataset import load_build_config
from lambda_eclipse.dataset.crop import mask_box, subject_crop
from lambda_eclipse.dataset.filters import FilterConfig, filter_records
from lambda_eclipse.dataset.records import Box, Record, read_shard, write_shard
from lambda_eclipse.dataset.sources import BadImage, list_sources, open_image
from lambda_eclipse.dataset.stages import first_records
from lambda_eclipse.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
OPEN = FilterConfig(min_side=0, max_white_share=1.0, box_ratio_min=0.0, box_ratio_max=1.0, min_logit=0.0,
                    min_mask_share=0.0)


def scene(width=200, height=100, boxes=(("dog", (10, 10, 60, 90), 0.9),), fill=True, background=128):
    """A flat image with solid (or empty) masks exactly filling each box."""
    image = Image.new("RGB", (width, height), (background,) * 3)
    record = Record("s", width, height, "a dog and a cat and a hat", {"dog": "dog", "cat": "cat", "hat": "hat"})
    for word, xyxy, score in boxes:
        record.boxes.append(Box(word, xyxy, score))
        mask = np.zeros((height, width), bool)
        if fill:
            x0, y0, x1, y1 = xyxy
            mask[y0:y1, x0:x1] = True
        record.masks.append(mask)
    return record, image


def run(cfg, record, image):
    kept, drops = filter_records([record], [image], cfg)
    return kept[0], drops


@pytest.mark.parametrize("rule, change, setup", [
    ("min_resolution", dict(min_side=150), {}),
    ("box_count", dict(max_boxes=1), dict(boxes=(("dog", (0, 0, 50, 50), 0.9), ("cat", (50, 0, 100, 50), 0.9)))),
    ("box_count", dict(min_boxes=1), dict(boxes=())),
    ("identical_objects", dict(max_identical=1), dict(boxes=(("dog", (0, 0, 50, 50), 0.9), ("dog", (50, 0, 99, 50), 0.8)))),
    ("white_background", dict(max_white_share=0.1), dict(background=255)),
    ("subjects", dict(max_subjects=1), dict(boxes=(("dog", (0, 0, 50, 50), 0.9), ("cat", (50, 0, 100, 50), 0.9)))),
])
def test_each_image_rule_drops_its_case_and_only_it(rule, change, setup):
    from dataclasses import replace

    record, image = scene(**setup)
    kept, drops = run(replace(OPEN, **change), record, image)
    assert kept.dropped == rule and drops == Counter({rule: 1}) and kept.boxes == []
    record, image = scene(**setup)
    if rule not in ("box_count",) or setup.get("boxes"):
        kept, drops = run(replace(OPEN, min_subjects=0), record, image)  # the same record passes the open rules
        assert kept.dropped == "" and not drops


@pytest.mark.parametrize("rule, change, box, fill", [
    ("box_ratio", dict(box_ratio_min=0.08), (0, 0, 10, 10), True),  # 100 / 20000 px of the image
    ("box_ratio", dict(box_ratio_max=0.7), (0, 0, 200, 100), True),
    ("box_ratio", dict(box_ratio_measure="aspect", box_ratio_max=0.7), (0, 0, 90, 100), True),
    ("logit", dict(min_logit=0.3), (0, 0, 50, 50), True),
    ("mask_share", dict(min_mask_share=0.4), (0, 0, 50, 50), False),
])
def test_each_box_rule_drops_the_box_and_then_the_subjectless_image(rule, change, box, fill):
    from dataclasses import replace

    score = 0.25 if rule == "logit" else 0.9
    # The cat passes every rule: area share 0.105, aspect 0.58, full mask.
    record, image = scene(boxes=(("dog", box, score), ("cat", (100, 0, 135, 60), 0.9)), fill=fill)
    record.masks[1][0:60, 100:135] = True
    kept, drops = run(replace(OPEN, **change), record, image)
    assert drops == Counter({rule: 1}) and kept.words == ["cat"] and len(kept.masks) == 1


def test_one_box_per_word_the_best_in_caption_order():
    record, image = scene(boxes=(("hat", (0, 0, 40, 40), 0.5), ("dog", (50, 0, 90, 40), 0.4),
                                 ("dog", (100, 0, 150, 40), 0.8)))
    kept, _ = run(OPEN, record, image)
    assert kept.words == ["dog", "hat"] and kept.boxes[0].xyxy == (100, 0, 150, 40)


def test_subject_crop_is_the_masked_box_on_white_with_its_aspect():
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, :, 0] = 200
    mask = np.zeros((100, 200), bool)
    mask[20:80, 50:80] = True  # 30 x 60 subject inside a 60 x 60 box
    crop = subject_crop(Image.fromarray(pixels), mask, Box("dog", (35, 20, 95, 80), 1.0), size=48)
    array = np.asarray(crop)
    assert crop.size == (48, 48)
    assert (array[:, :8] == 255).all() and (array[:, -8:] == 255).all()  # outside the mask: white
    assert (array[24, 20:28, 0] == 200).all() and (array[24, 20:28, 1] == 0).all()  # the subject itself
    # A 30 x 60 box: padded square with white, so the subject keeps its 1:2 aspect (24 x 48 of the 48 x 48 crop).
    tall = np.asarray(subject_crop(Image.fromarray(pixels), mask, Box("dog", (50, 20, 80, 80), 1.0), size=48))
    red = tall[..., 1] < 128
    cols, rows = np.flatnonzero(red.any(0)), np.flatnonzero(red.any(1))
    assert rows[-1] - rows[0] + 1 == 48 and abs((cols[-1] - cols[0] + 1) - 24) <= 1
    assert (tall[:, :10] == 255).all() and (tall[:, -10:] == 255).all()


def test_crop_resample_is_a_choice_and_mask_box_is_tight():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[10:50, 12:44] = True
    assert mask_box(mask) == (12, 10, 44, 50)
    # A 40 x 40 square of the box shrunk 4x by the box filter is the mean of each 4 x 4 block (its area mean).
    square = np.full((40, 40, 3), 255, np.uint8)
    square[:, 4:36] = pixels[10:50, 12:44]
    box = np.asarray(subject_crop(Image.fromarray(pixels), mask, mask_box(mask), size=10, resample="box")).astype(int)
    means = square.reshape(10, 4, 10, 4, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(box - means).max() <= 1
    bicubic = np.asarray(subject_crop(Image.fromarray(pixels), mask, mask_box(mask), size=10)).astype(int)
    assert np.abs(bicubic - means).max() > 8  # the default keeps CLIP's bicubic filter: another picture
    with pytest.raises(UserError, match="crop_resample"):
        load_build_config(None, ["input.path=x", "stages.crop_resample=nearest"])


def test_a_target_picture_beside_an_image_is_its_target_not_an_input(tmp_path):
    Image.new("RGB", (40, 40), "red").save(tmp_path / "a.png")
    Image.new("RGB", (10, 10), "blue").save(tmp_path / "a.target.png")
    Image.new("RGB", (20, 20), "green").save(tmp_path / "b.target.png")  # no b.png: an input of its own
    refs = {r.source_id: r for r in list_sources(tmp_path)}
    assert sorted(refs) == ["a.png", "b.target.png"] and refs["b.target.png"].target == ""
    assert open_image(refs["a.png"].target_ref(), 10**6).size == (10, 10)
    assert refs["b.target.png"].target_ref() is refs["b.target.png"]
    (tmp_path / "c.png").write_bytes(_jpeg(Image.new("RGB", (8, 8))))
    (tmp_path / "c.target.png").write_bytes(b"broken")
    records, _ = first_records(list_sources(tmp_path), 10**6)  # a bad target picture is listed, not fatal
    assert [r.dropped.startswith("unreadable: target picture") for r in records] == [False, False, True]


def test_records_round_trip_through_a_shard(tmp_path):
    record, _ = scene()
    record.crops = [Image.new("RGB", (7, 5), (1, 2, 3))]
    record.masks[0][3, 4] = False
    write_shard(tmp_path / "shard-00000.jsonl", [record, Record("gone", dropped="unreadable: x")])
    back = read_shard(tmp_path / "shard-00000.jsonl")
    assert back[0].boxes == record.boxes and (back[0].masks[0] == record.masks[0]).all()
    assert np.asarray(back[0].crops[0]).tolist() == np.asarray(record.crops[0]).tolist()
    assert back[1].dropped == "unreadable: x" and back[0].nouns == record.nouns


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def test_webdataset_tar_and_folder_inputs(tmp_path):
    shards = tmp_path / "wds"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for key, caption in (("000", "a dog"), ("001", "a cat")):
            for name, data in ((f"{key}.jpg", _jpeg(Image.new("RGB", (40, 30), "red"))), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    refs = list_sources(shards)
    assert [(r.source_id, r.caption) for r in refs] == [("00000.tar/000", "a dog"), ("00000.tar/001", "a cat")]
    assert open_image(refs[1], 10**6).size == (40, 30)
    with pytest.raises(BadImage, match="pixels"):
        open_image(refs[0], 100)  # larger than the guard: skipped, not decoded
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        list_sources(tmp_path / "empty")


def test_parquet_input(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"key": ["a", "b"], "caption": ["a dog", None],
                      "jpg": [_jpeg(Image.new("RGB", (20, 10), "blue")), b"broken"]})
    pq.write_table(table, tmp_path / "00000.parquet")
    refs = list_sources(tmp_path)
    assert [(r.source_id, r.caption) for r in refs] == [("00000.parquet/a", "a dog"), ("00000.parquet/b", "")]
    assert open_image(refs[0], 10**6).size == (20, 10)
    with pytest.raises(BadImage):
        open_image(refs[1], 10**6)


def test_cmyk_and_16_bit_inputs_become_8_bit_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "deep.png")
    refs = {r.source_id: r for r in list_sources(tmp_path)}
    red = np.asarray(open_image(refs["cmyk.jpg"], 10**6))
    assert red.dtype == np.uint8 and red[..., 0].min() > 200 and red[..., 1].max() < 60
    white = np.asarray(open_image(refs["deep.png"], 10**6))
    assert white.shape == (8, 8, 3) and white.min() == 255  # scaled from 16 bits, not clipped to 255 from 0..65535


def test_nouns_with_a_small_spacy_pipeline_and_a_missing_model():
    pytest.importorskip("spacy")
    from dataset_tiny import tiny_spacy

    from lambda_eclipse.dataset.nouns import load_spacy, subject_nouns

    found = subject_nouns(tiny_spacy(), ["A Dog wearing a hat, and a dog", "a photo of nothing"], max_nouns=8)
    assert found == [{"dog": "dog", "hat": "hat"}, {}]
    assert subject_nouns(tiny_spacy(), ["a dog wearing a hat"], max_nouns=1) == [{"dog": "dog"}]
    with pytest.raises(UserError, match="python -m spacy download en_core_web_nonexistent"):
        load_spacy("en_core_web_nonexistent")


def test_detector_prompt_spans():
    from lambda_eclipse.dataset.ground import detector_prompt

    text, spans = detector_prompt(["dog", "red hat"])
    assert text == "dog . red hat ." and [text[a:b] for a, b in spans] == ["dog", "red hat"]


def test_model_stages_on_tiny_models():
    from dataset_tiny import tiny_captioner, tiny_detector, tiny_segmenter

    from lambda_eclipse.dataset.caption import caption_images
    from lambda_eclipse.dataset.ground import ground_subjects
    from lambda_eclipse.dataset.segment import segment_boxes

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)) for _ in range(3)]
    captions = caption_images(tiny_captioner(), images, max_new_tokens=6)
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    assert caption_images(tiny_captioner(), images[:1], max_new_tokens=6) == captions[:1]  # greedy: reproducible
    nouns = [{"dog": "dog", "hat": "hat"}, {}, {"cat": "cat"}]
    boxes = ground_subjects(tiny_detector(), images, nouns, box_threshold=0.0, text_threshold=0.0)
    assert boxes[1] == [] and boxes[0] and boxes[2]
    assert {b.word for b in boxes[0]} <= {"dog", "hat"} and {b.word for b in boxes[2]} == {"cat"}
    for b in boxes[0]:
        x0, y0, x1, y1 = b.xyxy
        assert 0 <= x0 <= x1 <= 90.01 and 0 <= y0 <= y1 <= 60.01 and 0 <= b.score <= 1
    assert [b.score for b in boxes[0]] == sorted((b.score for b in boxes[0]), reverse=True)
    strict = ground_subjects(tiny_detector(), images, nouns, box_threshold=1.0, text_threshold=1.0)
    assert strict == [[], [], []]
    masks = segment_boxes(tiny_segmenter(), images, [boxes[0][:2], [], boxes[2][:1]])
    assert [len(m) for m in masks] == [len(boxes[0][:2]), 0, 1]
    assert masks[0][0].shape == (60, 90) and masks[0][0].dtype == bool


def test_shipped_dataset_config_parses_and_bad_keys_are_one_line_errors(tmp_path):
    from lambda_eclipse.cli import main
    from lambda_eclipse.dataset import load_build_config

    cfg = load_build_config(ROOT / "configs" / "dataset-paper.yaml", [f"input.path={tmp_path}"])
    assert cfg.filter.max_subjects == 4 and cfg.stages.box_threshold == 0.2 and cfg.filter.min_mask_share == 0.4
    with pytest.raises(UserError, match="input.path is empty"):
        load_build_config(ROOT / "configs" / "dataset-paper.yaml")
    with pytest.raises(UserError, match="build-dataset --help-config"):
        load_build_config(None, [f"input.path={tmp_path}", "filter.nonsense=1"])
    assert main(["build-dataset", f"input.path={tmp_path / 'missing'}", f"output_dir={tmp_path / 'out'}"]) == 2
    assert not (tmp_path / "out").exists()  # nothing written for a bad input


def test_segment_subject_cuts_the_word_out_onto_white():
    from dataset_tiny import tiny_detector, tiny_segmenter

    from lambda_eclipse.dataset.subject import segment_subject

    photo = Image.open(ROOT.parent / "shared" / "reference" / "dreambench" / "dog" / "00.jpg") \
        if (ROOT.parent / "shared" / "reference" / "dreambench" / "dog" / "00.jpg").is_file() \
        else Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    detector, segmenter = tiny_detector(), tiny_segmenter()
    cut = segment_subject(photo, "dog", detector, segmenter, 0.0, 0.0)
    assert cut.width == cut.height and cut.width <= max(photo.size)
    array = np.asarray(cut)
    assert (array == 255).all(axis=-1).any()  # masked off or padded: some white
    with pytest.raises(UserError, match="no 'dog' found"):
        segment_subject(photo, "dog", detector, segmenter, 1.0, 1.0)


def test_segment_subjects_saves_the_cut_out_beside_the_outputs(tmp_path):
    from dataset_tiny import tiny_detector, tiny_segmenter

    from lambda_eclipse.dataset.subject import segment_subjects

    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    result = segment_subjects({"dog": photo, "cat": "cat.safetensors"}, str(tmp_path), tiny_detector(),
                              tiny_segmenter(), box_threshold=0.0, text_threshold=0.0)
    assert result["cat"] == "cat.safetensors" and result["dog"].width == result["dog"].height
    saved = list(tmp_path.glob("segmented-dog-*.png"))
    assert len(saved) == 1 and Image.open(saved[0]).size == result["dog"].size


def test_a_work_folder_refuses_another_input(tmp_path):
    from lambda_eclipse.dataset import load_build_config
    from lambda_eclipse.dataset.runner import Workdir

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "x.png")
    first = Workdir(load_build_config(None, [f"input.path={tmp_path / 'a'}", f"output_dir={tmp_path / 'out'}"]))
    assert [r.source_id for r in first.refs] == ["x.png"]
    with pytest.raises(UserError, match="holds a build of"):
        Workdir(load_build_config(None, [f"input.path={tmp_path / 'b'}", f"output_dir={tmp_path / 'out'}"]))
