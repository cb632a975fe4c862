"""`lambda-eclipse interpolate`, several pictures per subject and the control flags on the command line."""

import json

import numpy as np
import pytest
from PIL import Image

from lambda_eclipse.cli import main


def png(path, seed, size=(40, 30), mode="RGB"):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert(mode).save(path)
    return path


def cli(*args):
    return main([str(a) for a in args])


def test_interpolate_line_and_its_files(model_dir, tmp_path, capsys):
    a, b, c = png(tmp_path / "a.png", 1), png(tmp_path / "b.png", 2, (20, 50), "L"), png(tmp_path / "c.png", 3)
    out = tmp_path / "out"
    assert cli("interpolate", "--corner", "a dog on the beach", "--subject", f"dog={a}", "--subject", f"dog={b}",
               "--corner", "a dog wearing a hat", "--subject", f"dog={c}", "--frames", 3, "--steps", 1,
               "--model", model_dir, "--out", out, "--quiet", "--subject-scale", 0.5) == 0
    frames = sorted(out.glob("*-frame*.png"))
    assert len(frames) == 3 and len(list(out.glob("*.gif"))) == 1 and len(list(out.glob("*-grid.png"))) == 1
    corners = json.loads(Image.open(frames[0]).text["corners"])
    assert corners[0]["subjects"] == {"dog": [str(a), str(b)]} and corners[1]["subjects"] == {"dog": str(c)}
    assert json.loads(Image.open(frames[2]).text["weights"])["top_right"] == 1.0
    assert len(list(out.glob("*-embeds.safetensors"))) == 1
    assert cli("interpolate", "--corner", "a dog on the beach", "--corner", "a dog wearing a hat", "--frames", 3,
               "--steps", 1, "--model", model_dir, "--out", out, "--quiet", "--spacing", "perceptual", "--probes", 5) == 0
    placed = [Image.open(f).text for f in sorted(out.glob("*-frame001.png")) if "probes" in Image.open(f).text["settings"]]
    assert len(placed) == 1 and json.loads(placed[0]["settings"])["probes"] == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--corner", "a dog"], "got 1; give 2 or 4"),
        (["--corner", "a dog", "--corner", "a cat", "--corner", "a hat"], "got 3"),
        (["--subject", "dog=x.png", "--corner", "a dog", "--corner", "a cat"], "before any --corner"),
        (["--corner", "a dog", "--corner", "a cat", "--subject-scale", "nan"], "--subject-scale must be"),
        (["--corner", "a dog", "--corner", "a cat", "--frames", "1"], "steps"),
        (["--corner", "a dog", "--corner", "a cat", "--spacing", "perceptual", "--probes", "3"], "probes"),
        (["--corner", "a dog", "--subject", "dog=MISSING.png", "--corner", "a cat"], "does not exist"),
    ],
)
def test_interpolate_errors_write_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    try:
        status = cli("interpolate", *args, "--out", out, "--model", tmp_path / "NOWHERE")
    except SystemExit as exit_:  # a flag-order mistake is argparse's one-line error
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_several_pictures_and_flags_in_generate_and_encode_subject(model_dir, tmp_path, tiny_pipe):
    from safetensors import safe_open

    a, b = png(tmp_path / "a.png", 1), png(tmp_path / "b.png", 2, (64, 64), "RGBA")
    emb = tmp_path / "dog.safetensors"
    assert cli("encode-subject", f"dog={a}", f"dog={b}", "--out", emb, "--model", model_dir) == 0
    with safe_open(str(emb), "pt") as handle:  # model_dir holds tiny_pipe's weights (the same seed)
        expected = tiny_pipe.encode_subject([Image.open(a), Image.open(b)], "dog")
        assert np.allclose(handle.get_tensor("image_embeds").numpy(), expected.numpy(), atol=1e-5)
    out = tmp_path / "out"
    common = ["--steps", 1, "--model", model_dir, "--quiet", "--scheduler", "ddim"]
    assert cli("generate", "a dog", "--subject", f"dog={a}", "--subject", f"dog={b}", "--subject-scale", 0,
               "--out", out / "zero", *common) == 0
    assert json.loads(Image.open(next((out / "zero").glob("*.png"))).text["subjects"]) == {"dog": [str(a), str(b)]}
    assert cli("generate", "a dog", "--out", out / "text", *common) == 0
    zero, text = (np.asarray(Image.open(next((out / d).glob("*.png")))) for d in ("zero", "text"))
    assert np.array_equal(zero, text)  # subject scale 0 = the text-only image
    assert cli("generate", "a dog", "--subject-scale", 3, "--out", out / "bad", *common) == 2
    assert cli("encode-subject", f"dog={a}", f"cat={b}", "--out", tmp_path / "x.safetensors", "--model", model_dir) == 2
