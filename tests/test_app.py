"""The web demo: form -> pipeline call, PNGs with metadata, progress, the `demo` command; then (slow tier) the
running app through its API (two concurrent requests, a bad upload) and in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lambda_eclipse.app import (DemoConfig, GenerateForm, form_from_values, form_request, interpolate_form_from_values,
                                run_generate, run_interpolate, segment_or_note)
from lambda_eclipse.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# Debian's chromium, driven by Playwright without its own browser download.
CHROMIUM = os.environ.get("LAMBDA_ECLIPSE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def pictures(tmp_path):
    """Two small RGBA subject pictures and a file that is not an image but is named like one."""
    rng = np.random.default_rng(0)
    paths = []
    for name in ("dog.png", "cat.png"):
        Image.fromarray(rng.integers(0, 255, (24, 20, 4), dtype=np.uint8), "RGBA").save(tmp_path / name)
        paths.append(str(tmp_path / name))
    bad = tmp_path / "broken.png"
    bad.write_text("not a picture")
    return paths[0], paths[1], str(bad)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------- fast tier
def test_form_values_skip_blank_rows_and_refuse_half_filled_ones(pictures):
    dog, cat, _ = pictures
    form = form_from_values("a dog and a cat", [" dog ", "", "cat"], [[dog], None, cat], None, 3.0, 2, 10, 4.0,
                            "model default", None, 32.0)
    assert form.subjects == [("dog", [dog]), ("cat", [cat])]
    assert (form.seed, form.num_images, form.steps, form.scheduler, form.height, form.width) == (3, 2, 10, None, None, 32)
    with pytest.raises(UserError, match="subject 'dog' \\(row 1\\) has no image"):
        form_from_values("a dog", ["dog"], [None], None, 0, 1, 10, 4.0, "ddim", None, None)
    with pytest.raises(UserError, match="row 2 has images but no word"):
        form_from_values("a dog", ["dog", " "], [[dog], [cat]], None, 0, 1, 10, 4.0, "ddim", None, None)
    with pytest.raises(UserError, match="seed must be a whole number"):
        form_from_values("a dog", [], [], None, 1.5, 1, 10, 4.0, "ddim", None, None)


def test_form_request_decodes_uploads_and_checks_every_value(pictures, monkeypatch):
    from lambda_eclipse import inputs

    dog, cat, bad = pictures
    kwargs, seeds = form_request(GenerateForm("a dog and a cat", [("dog", [dog]), ("cat", [cat])], seed=7,
                                              num_images=3, steps=5, guidance=2.0, scheduler="ddim"))
    assert seeds == [7, 8, 9]
    assert [g.initial_seed() for g in kwargs["generator"]] == seeds
    assert [type(kwargs["subjects"][w]) for w in ("dog", "cat")] == [Image.Image, Image.Image]
    # several pictures of one subject reach the pipeline's checks as a list (a pipeline that takes lists uses them)
    checked = {}
    monkeypatch.setattr(inputs, "check_inputs", lambda prompt, **kw: checked.update(kw))
    form_request(GenerateForm("a cat", [("cat", [cat, dog])]))
    assert [type(i) for i in checked["subjects"]["cat"]] == [Image.Image, Image.Image]
    monkeypatch.undo()
    assert (kwargs["num_images_per_prompt"], kwargs["num_inference_steps"], kwargs["scheduler"]) == (3, 5, "ddim")
    with pytest.raises(UserError, match="subject 'dog' image file .*broken.png.* is not an image"):
        form_request(GenerateForm("a dog", [("dog", [bad])]))
    with pytest.raises(UserError, match="'cat' does not occur in the prompt"):
        form_request(GenerateForm("a dog", [("cat", [cat])]))
    with pytest.raises(UserError, match="^number of images must be a positive whole number"):
        form_request(GenerateForm("a dog", num_images=0))


def test_run_generate_saves_pngs_with_metadata_and_reports_each_step(tiny_pipe, pictures, tmp_path):
    dog, _, _ = pictures
    steps = []
    form = GenerateForm("a dog on the beach", [("dog", [dog])], seed=4, num_images=2, steps=3, guidance=2.0)
    saved = run_generate(tiny_pipe, form, tmp_path / "out", "tiny", on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert [caption.split(" · ")[0] for _, caption in saved] == ["seed 4", "seed 5"]
    first = Image.open(saved[0][0])
    assert json.loads(first.text["subjects"]) == {"dog": ["dog.png"]} and first.text["seed"] == "4"
    assert json.loads(first.text["settings"])["steps"] == 3
    # the same request again writes new files (never overwrites) with the same pixels (seeded)
    again = run_generate(tiny_pipe, form, tmp_path / "out", "tiny")
    assert again[0][0] != saved[0][0]
    assert np.array_equal(np.asarray(Image.open(again[0][0])), np.asarray(first))


def test_subject_scale_edge_strength_and_segment_reach_the_pipeline(pictures):
    dog, _, _ = pictures
    form = form_from_values("a dog", ["dog"], [[dog]], None, 0, 1, 5, 4.0, "ddim", None, None, 0.0, 1.5, True, True)
    assert (form.subject_scale, form.edge_strength, form.segment, form.edge_is_map) == (0.0, 1.5, True, True)
    kwargs, _ = form_request(form)
    assert (kwargs["subject_scale"], kwargs["edge_strength"], kwargs["edge_is_map"]) == (0.0, 1.5, True)
    with pytest.raises(UserError, match="^subject scale"):
        form_request(GenerateForm("a dog", subject_scale=3.0))


def test_segmentation_that_cannot_run_is_a_note_and_the_pictures_are_used_as_uploaded(tiny_pipe, pictures, tmp_path):
    dog, _, _ = pictures
    picture = Image.open(dog)
    cut = Image.new("RGB", (8, 8), "white")
    assert segment_or_note({"dog": picture}, tmp_path, lambda subjects, out: {"dog": cut}) == ({"dog": cut}, "")

    def cannot_load(subjects, out):
        raise UserError("--segment cannot load its detector/segmenter (offline)")

    subjects, note = segment_or_note({"dog": picture}, tmp_path, cannot_load)
    assert subjects == {"dog": picture} and note.startswith("segmentation skipped") and "offline" in note
    notes = []
    form = GenerateForm("a dog on the beach", [("dog", [dog])], num_images=1, steps=2, segment=True, subject_scale=0.5)
    saved = run_generate(tiny_pipe, form, tmp_path / "out", "tiny", on_note=notes.append, segment=cannot_load,
                         decoder={"lora": "l.safetensors", "lora_scale": 0.5})
    assert len(saved) == 1 and notes == [note]
    settings = json.loads(Image.open(saved[0][0]).text["settings"])
    assert (settings["segment"], settings["subject_scale"], settings["lora"], settings["lora_scale"]) == (True, 0.5, "l.safetensors", 0.5)
    assert "subject scale 0.5" in saved[0][1]


def test_interpolate_tab_writes_the_grid_and_gif_with_the_cli_writer(tiny_pipe, pictures, tmp_path):
    dog, cat, _ = pictures
    form = interpolate_form_from_values(2, ["a dog on the beach", "a cat in the snow", None, None],
                                        ["dog", "cat", None, None], [[dog], [cat, dog], None, None], 3, "lerp", 2, 2, 2.0)
    assert form.corners == [("a dog on the beach", [("dog", [dog])]), ("a cat in the snow", [("cat", [cat, dog])])]
    written = run_interpolate(tiny_pipe, form, tmp_path / "out", "tiny")
    assert len(written["frames"]) == 3 and written["gif"].suffix == ".gif" and Image.open(written["gif"]).n_frames == 3
    grid = Image.open(written["grid"])
    assert json.loads(grid.text["corners"])[1]["subjects"] == {"cat": ["cat.png", "dog.png"]}
    grid4 = run_interpolate(tiny_pipe, interpolate_form_from_values(
        4, ["a dog", "a cat", "a dog at night", "a cat at night"], ["dog", "", "", "cat"], [[dog], None, None, [cat]],
        2, "slerp", 0, 2, 2.0), tmp_path / "out", "tiny")
    assert len(grid4["frames"]) == 4 and grid4["gif"] is None  # a 2 × 2 grid; a GIF only for a line
    even = run_interpolate(tiny_pipe, interpolate_form_from_values(
        2, ["a dog", "a cat", None, None], [None] * 4, [None] * 4, 3, "slerp", 0, 2, 2.0, 1.0, "perceptual"),
        tmp_path / "out", "tiny")
    middle = Image.open(even["frames"][1]).text
    assert json.loads(middle["settings"])["spacing"] == "perceptual" and json.loads(middle["position"])[1] != 0.5
    with pytest.raises(UserError, match="corner 2 \\(end / top-right\\) has no prompt"):
        interpolate_form_from_values(2, ["a dog", " ", "", ""], [None] * 4, [None] * 4, 3, "slerp", 0, 2, 2.0)
    with pytest.raises(UserError, match="2 corners .* or 4"):
        interpolate_form_from_values(3, ["a"] * 4, [None] * 4, [None] * 4, 3, "slerp", 0, 2, 2.0)


def test_demo_command_passes_its_flags(monkeypatch, tmp_path):
    from lambda_eclipse import app, cli

    seen = {}
    monkeypatch.setattr(app, "launch_demo", lambda config, block=True: seen.update(config=config, block=block))
    assert cli.main(["demo", "--model", "m", "--host", "0.0.0.0", "--port", "8123", "--out", "o"]) == 0
    assert seen == {"config": DemoConfig(model="m", host="0.0.0.0", port=8123, out="o"), "block": True}
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"")
    assert cli.main(["demo", "--unet", str(tmp_path), "--lora", str(lora), "--lora-scale", "0.5"]) == 0
    assert (seen["config"].unet, seen["config"].lora, seen["config"].lora_scale) == (str(tmp_path), str(lora), 0.5)
    assert cli.main(["demo", "--lora", str(tmp_path / "missing")]) == 2


def test_demo_without_gradio_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # what an install without the demo extra sees
    from lambda_eclipse import cli

    assert cli.main(["demo"]) == 2
    assert "pip install 'lambda-eclipse[demo]'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- slow tier
def api_args(prompt: str, subjects: list[tuple[str, str]], rows: int = 6, seed: int = 0, num_images: int = 1,
             steps: int = 3, size: int = 16) -> list:
    """The /generate endpoint's positional values: prompt, rows shown, words, files, then the settings."""
    from gradio_client import handle_file

    words = [w for w, _ in subjects] + [""] * (rows - len(subjects))
    files = [[handle_file(f)] for _, f in subjects] + [None] * (rows - len(subjects))
    return [prompt, max(len(subjects), 1), *words, *files, None, seed, num_images, steps, 2.0, "model default",
            size, size, 1.0, 1.0, False, False]


@pytest.fixture
def tiny_app(tmp_path):
    pytest.importorskip("gradio")
    from tiny import tiny_pipeline

    from lambda_eclipse.app import launch_demo

    pipe = tiny_pipeline()
    port = free_port()
    demo = launch_demo(DemoConfig(model="tiny", port=port, out=str(tmp_path / "demo-out")), block=False, pipe=pipe)
    yield pipe, f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.mark.slow
def test_api_serves_two_concurrent_requests_and_survives_a_bad_upload(tiny_app, pictures):
    from gradio_client import Client

    pipe, url = tiny_app
    dog, cat, bad = pictures
    requests = {"a": ("a dog on the beach", [("dog", dog)], 0, 2), "b": ("a cat wearing a hat", [("cat", cat)], 5, 3)}
    results, errors = {}, []

    def call(key):
        prompt, subjects, seed, n = requests[key]
        try:  # one client per visitor: two browsers, not two tabs of one
            results[key] = Client(url, verbose=False).predict(*api_args(prompt, subjects, seed=seed, num_images=n),
                                                              api_name="/generate")
        except Exception as error:  # noqa: BLE001 -- reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=call, args=(key,)) for key in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and set(results) == {"a", "b"}
    for key, (prompt, subjects, seed, n) in requests.items():
        gallery, files, note = results[key]
        assert [item["caption"].split(" · ")[0] for item in gallery] == [f"seed {seed + i}" for i in range(n)]
        assert note.startswith(f"{n} images in")
        # each request got its own images: the pixels of a lone, direct call with the same seeds
        form = GenerateForm(prompt, [(w, [p]) for w, p in subjects], seed=seed, num_images=n, steps=3, guidance=2.0,
                            height=16, width=16)
        kwargs, _ = form_request(form, pipe)
        direct = pipe(prompt, **kwargs, output_type="np").images
        served = np.stack([np.asarray(Image.open(item["image"]), dtype=np.float32) / 255 for item in gallery])
        assert np.abs(served - direct).max() <= 1 / 255 + 1e-6

    client = Client(url, verbose=False)
    # the parameters are named: a request by keyword, with segmentation that cannot load offline (a note, and the
    # picture used as uploaded) and an interpolation through its own endpoint
    from gradio_client import handle_file

    named = [p["parameter_name"] for p in client.view_api(print_info=False, return_format="dict")
             ["named_endpoints"]["/generate"]["parameters"]]
    assert named[:3] == ["prompt", "subject_rows", "word_1"] and named[-4:] == ["subject_scale", "edge_strength", "segment", "edge_is_map"]
    gallery, _, note = client.predict(*api_args("a dog on the beach", [("dog", dog)])[:-4], subject_scale=0.5,
                                      edge_strength=1.0, segment=True, edge_is_map=False, api_name="/generate")
    assert len(gallery) == 1 and "segmentation skipped" in note and "subject scale 0.5" in gallery[0]["caption"]
    grid, gif, files, note = client.predict(
        corners=2, prompt_1="a dog on the beach", prompt_2="a cat wearing a hat", prompt_3="", prompt_4="",
        word_1="dog", word_2="cat", word_3="", word_4="", pictures_1=[handle_file(dog)], pictures_2=[handle_file(cat)],
        pictures_3=None, pictures_4=None, frames=3, path="slerp", seed=1, steps=2, guidance=2.0, subject_scale=1.0,
        api_name="/interpolate")
    assert note.startswith("3 frames in") and gif.endswith(".gif") and Image.open(gif).n_frames == 3
    assert len(files) == 6 and sum("-frame" in Path(f).name for f in files) == 3  # + grid, GIF, embeddings

    with pytest.raises(Exception, match="is not an image PIL can read"):
        client.predict(*api_args("a dog on the beach", [("dog", bad)]), api_name="/generate")
    gallery, _, _ = client.predict(*api_args("a dog on the beach", [("dog", dog)], num_images=2), api_name="/generate")
    assert len(gallery) == 2


@pytest.mark.slow
def test_demo_serves_a_fine_tuned_unet(tmp_path):
    """`demo --unet DIR`: the served pipeline decodes with the UNet in DIR, and the page names it."""
    pytest.importorskip("gradio")
    import torch
    from gradio_client import Client
    from tiny import tiny_pipeline

    from lambda_eclipse.app import launch_demo

    pipe = tiny_pipeline()
    tuned = tiny_pipeline().unet
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.add_(0.01)
    tuned.save_pretrained(tmp_path / "run" / "unet")
    port = free_port()
    demo = launch_demo(DemoConfig(model="tiny", port=port, out=str(tmp_path / "out"), unet=str(tmp_path / "run")),
                       block=False, pipe=pipe)
    try:
        assert all(torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), tuned.parameters()))
        assert f"unet `{tmp_path / 'run'}`" in str(demo.config)
        gallery, _, _ = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            *api_args("a dog on the beach", []), api_name="/generate")
        assert json.loads(Image.open(gallery[0]["image"]).text["settings"])["unet"] == str(tmp_path / "run")
    finally:
        demo.close()


@pytest.mark.slow
def test_in_a_real_browser(tmp_path, pictures):
    """Headless Chromium against the demo on the bundled model: two uploaded subjects, a gallery of the requested
    size, a mistake shown in the page that leaves it working, an unreadable upload, and an example in one click."""
    pytest.importorskip("gradio")
    sync_api = pytest.importorskip("playwright.sync_api")
    # Not a skip: .ci/run installs Chromium, so a missing one is a broken set-up, not a reason to pass quietly.
    assert Path(CHROMIUM).is_file(), f"no Chromium at {CHROMIUM}: apt-get install chromium (as .ci/run does)"
    from lambda_eclipse.app import launch_demo

    _, _, bad = pictures
    port = free_port()
    demo = launch_demo(DemoConfig(port=port, out=str(tmp_path / "out")), block=False)
    screenshot = os.environ.get("LAMBDA_ECLIPSE_DEMO_SCREENSHOT")
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            thumbnails = page.locator("#gallery .thumbnail-item")

            def set_number(elem_id: str, value: int) -> None:
                page.fill(f"#{elem_id} input[type=number]", str(value))
                page.press(f"#{elem_id} input[type=number]", "Enter")

            def generate_and_count(n: int, watch_progress: bool = False) -> None:
                set_number("num-images", n)
                page.click("#generate")
                if watch_progress:  # the decoder's steps, as the pipeline's callback reports them
                    sync_api.expect(page.get_by_text("decoding").first).to_be_visible(timeout=60_000)
                sync_api.expect(page.locator("#timing")).to_contain_text(f"{n} images in", timeout=120_000)
                sync_api.expect(thumbnails).to_have_count(n)

            page.fill("#prompt textarea", "a photo of a ball left of a paper plane over a teal grid background")
            page.fill("#subject-word-0 textarea", "ball")
            page.set_input_files("#subject-files-0 input[type=file]", str(EXAMPLES / "ball.png"))
            page.click("#add-subject")
            page.fill("#subject-word-1 textarea", "paper plane")
            page.set_input_files("#subject-files-1 input[type=file]", str(EXAMPLES / "paper-plane.png"))
            sync_api.expect(page.locator("#subject-preview-1 img")).to_have_count(1)  # shown as the model sees it
            set_number("steps", 60)  # long enough to watch its progress on an idle machine too
            generate_and_count(3, watch_progress=True)
            assert "seed 2 · 60 steps" in page.inner_text("#gallery")
            set_number("steps", 25)
            sync_api.expect(page.locator("#downloads")).to_contain_text("-seed2")  # the PNG files to download

            # a mistake: a message in the page, and the page still works afterwards
            page.fill("#subject-word-0 textarea", "dog")
            page.click("#generate")
            sync_api.expect(page.get_by_text("does not occur in the prompt").first).to_be_visible(timeout=60_000)
            page.fill("#subject-word-0 textarea", "ball")
            generate_and_count(2)

            # an unreadable upload is a message too
            page.set_input_files("#subject-files-1 input[type=file]", bad)
            sync_api.expect(page.get_by_text("is not an image PIL can read").first).to_be_visible(timeout=60_000)

            # an example: one click fills the form (showing the second row again) and generates
            page.click("#remove-subject")
            sync_api.expect(page.locator("#subject-row-1")).to_be_hidden()
            page.locator(".gallery-item, tr").filter(has_text="a photo of a ball left of a paper plane").first.click()
            sync_api.expect(page.locator("#subject-row-1")).to_be_visible()
            sync_api.expect(page.locator("#subject-word-1 textarea")).to_have_value("paper plane")
            sync_api.expect(page.locator("#timing")).to_contain_text("4 images in", timeout=120_000)
            sync_api.expect(thumbnails).to_have_count(4)
            sync_api.expect(page.get_by_text("is not an image PIL can read")).to_have_count(0, timeout=30_000)
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            if screenshot:
                page.screenshot(path=screenshot, full_page=True)

            # an interpolation: 2 corners, 3 frames a side -> the labelled grid and the GIF of the line
            page.get_by_role("tab", name="Interpolate").click()
            page.fill("#corner-prompt-0 textarea", "a ball on a teal grid background")
            page.fill("#corner-word-0 textarea", "ball")
            page.set_input_files("#corner-files-0 input[type=file]", str(EXAMPLES / "ball.png"))
            page.fill("#corner-prompt-1 textarea", "a star on a lavender gradient background")
            set_number("frames", 3)
            set_number("interpolate-steps", 5)
            page.click("#interpolate")
            sync_api.expect(page.locator("#interpolate-timing")).to_contain_text("3 frames in", timeout=120_000)
            sync_api.expect(page.locator("#grid img")).to_have_count(1)
            sync_api.expect(page.locator("#gif img")).to_have_attribute("src", re.compile(r"\.gif"))
            sync_api.expect(page.locator("#interpolate-downloads")).to_contain_text("frame002")
            if screenshot:  # docs/demo-interpolate.png beside docs/demo.png
                shot = Path(screenshot)
                page.screenshot(path=str(shot.with_name(f"{shot.stem}-interpolate{shot.suffix}")), full_page=True)
            browser.close()
    finally:
        demo.close()
