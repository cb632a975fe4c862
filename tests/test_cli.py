"""`lambda-eclipse generate` / `encode-subject`: outputs, metadata, and one-line errors that write nothing."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lambda_eclipse import encoders
from lambda_eclipse.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture
def dog_png(tmp_path):
    path = tmp_path / "dog.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 4), dtype=np.uint8), "RGBA").save(path)
    return path


def cli(*args):
    return main([str(a) for a in args])


def test_generate_writes_pngs_with_metadata(model_dir, dog_png, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli("generate", "a Dog on the beach", "--subject", f"dog={dog_png}", "-n", 2, "--seed", 7, "--steps", 2,
               "--model", model_dir, "--out", out, "--quiet", "--height", 24, "--width", 16, "--scheduler", "ddim") == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["a-dog-on-the-beach-seed7.png", "a-dog-on-the-beach-seed8.png"]
    image = Image.open(files[0])
    assert image.size == (16, 24)
    assert image.text["prompt"] == "a Dog on the beach" and image.text["seed"] == "7"
    assert json.loads(image.text["subjects"]) == {"dog": str(dog_png)}
    assert json.loads(image.text["settings"])["steps"] == 2
    assert not list(out.glob("*.tmp"))
    # Same seed, same image; a subject embedding file stands in for the image.
    emb = tmp_path / "dog.safetensors"
    assert cli("encode-subject", f"dog={dog_png}", "--out", emb, "--model", model_dir) == 0
    again = tmp_path / "again"
    cli("generate", "a Dog on the beach", "--subject", f"dog={emb}", "--seed", 8, "--steps", 2, "--model", model_dir,
        "--out", again, "--quiet", "--height", 24, "--width", 16, "--scheduler", "ddim")
    a = np.asarray(Image.open(files[1]), dtype=int)
    b = np.asarray(Image.open(again / "a-dog-on-the-beach-seed8.png"), dtype=int)
    assert np.abs(a - b).max() <= 1


def test_text_only_generation(model_dir, tmp_path):
    assert cli("generate", "a cat", "--steps", 1, "--model", model_dir, "--out", tmp_path / "o", "--quiet") == 0
    assert len(list((tmp_path / "o").glob("*.png"))) == 1


def bad_files(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), "red").save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:60])
    return text, truncated


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "a dog", "--subject", "dog=MISSING"], "does not exist"),
        (["generate", "a dog", "--subject", "dog"], "malformed subject"),
        (["generate", "a dog", "--subject", "dog=DOG", "--subject", "Dog=DOG"], "given twice"),
        (["generate", "a dog", "--subject", "cat=DOG"], "does not occur"),
        (["generate", "  "], "prompt is empty"),
        (["generate", "a " * 80], "at most 77"),
        (["generate", "a dog", "--steps", "0"], "--steps"),
        (["generate", "a dog", "-n", "-1"], "-n"),
        (["generate", "a dog", "--guidance", "inf"], "--guidance"),
        (["generate", "a dog", "--out", "AFILE"], "is a file"),
        (["generate", "a dog", "--subject", "dog=TEXT"], "not an image"),
        (["generate", "a dog", "--subject", "dog=TRUNC"], "cannot be decoded"),
        (["generate", "a dog", "--model", "NOWHERE"], "not a λ-ECLIPSE model folder"),
        (["generate", "a dog", "--model", "no-such-org/no-such-model"], "cannot load model"),
        (["encode-subject", "dog=DOG", "--out", "x.bin"], ".safetensors"),
    ],
)
def test_user_errors_are_one_line_and_write_nothing(args, message, model_dir, dog_png, tmp_path, capsys):
    text, truncated = bad_files(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "nowhere").mkdir()
    subs = {"MISSING": str(tmp_path / "missing.png"), "DOG": str(dog_png), "TEXT": str(text), "TRUNC": str(truncated),
            "AFILE": str(tmp_path / "afile"), "NOWHERE": str(tmp_path / "nowhere")}
    argv = [subs.get(a.split("=")[-1], a) if "=" not in a else a.split("=")[0] + "=" + subs.get(a.split("=")[1], a.split("=")[1]) for a in args]
    if "--model" not in argv:
        argv += ["--model", str(model_dir)]
    if argv[0] == "generate" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_decompression_bomb_is_refused(monkeypatch, dog_png):
    monkeypatch.setattr(encoders, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(encoders.UserError, match="too large"):
        encoders.load_image(dog_png)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), "blue")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert encoders.load_image(tmp_path / "r.jpg").size == (20, 40)


def test_console_script_error_has_no_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "lambda_eclipse.cli", "generate", "a dog", "--subject",
                             f"dog={tmp_path / 'none.png'}"], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
