"""`lambda-eclipse`: outputs, metadata, one-line errors that write nothing, an instant --help, the bundled model."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lambda_eclipse
from lambda_eclipse import cli as cli_module
from lambda_eclipse import encoders
from lambda_eclipse.cli import GenerateArgs, default_model, generate, main

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(lambda_eclipse.__file__).resolve().parent


@pytest.fixture(scope="module")
def text_only_dir(tmp_path_factory):
    from tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("model") / "text-only"
    tiny_pipeline(additional_embeddings=3).save_pretrained(path)
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
    assert len(files) == 2 and [f.name[-10:] for f in files] == ["-seed7.png", "-seed8.png"]
    assert all(f.name.startswith("a-dog-on-the-beach-") for f in files)
    image = Image.open(files[0])
    assert image.size == (16, 24)
    assert image.text["prompt"] == "a Dog on the beach" and image.text["seed"] == "7"
    assert json.loads(image.text["subjects"]) == {"dog": str(dog_png)}
    assert json.loads(image.text["settings"])["steps"] == 2
    assert sorted(p.name for p in out.iterdir()) == [f.name for f in files]  # no temporaries left beside them
    # Same seed, same image; a subject embedding file stands in for the image.
    emb = tmp_path / "dog.safetensors"
    assert cli("encode-subject", f"dog={dog_png}", "--out", emb, "--model", model_dir) == 0
    again = tmp_path / "again"
    cli("generate", "a Dog on the beach", "--subject", f"dog={emb}", "--seed", 8, "--steps", 2, "--model", model_dir,
        "--out", again, "--quiet", "--height", 24, "--width", 16, "--scheduler", "ddim")
    a = np.asarray(Image.open(files[1]), dtype=int)
    (regenerated,) = again.glob("*-seed8.png")
    b = np.asarray(Image.open(regenerated), dtype=int)
    assert np.abs(a - b).max() <= 1


def test_text_only_generation(model_dir, tmp_path):
    assert cli("generate", "a cat", "--steps", 1, "--model", model_dir, "--out", tmp_path / "o", "--quiet") == 0
    assert len(list((tmp_path / "o").glob("*.png"))) == 1


def test_generate_never_overwrites(model_dir, tmp_path):
    """Prompts sharing a long prefix, prompts without ASCII letters, and the same request twice: all kept."""
    out = tmp_path / "o"
    prefix = "a photo of a very small cat sitting quietly on the old wooden"
    for prompt in [prefix + " chair", prefix + " table", "猫", "犬", "猫"]:
        assert cli("generate", prompt, "--steps", 1, "--model", model_dir, "--out", out, "--quiet",
                   "--height", 16, "--width", 16) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 5 and len({f.name for f in files}) == 5
    assert sorted(Image.open(f).text["prompt"] for f in files) == sorted([prefix + " chair", prefix + " table", "猫", "犬", "猫"])


def test_write_new_file_claims_a_free_name(tmp_path):
    from lambda_eclipse.atomic import write_new_file

    first = write_new_file(tmp_path / "a.txt", lambda t: t.write_text("one"))
    second = write_new_file(tmp_path / "a.txt", lambda t: t.write_text("two"))
    assert (first.name, second.name) == ("a.txt", "a-1.txt")
    assert (first.read_text(), second.read_text()) == ("one", "two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-1.txt", "a.txt"]


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
        (["generate", "a dog", "--subject", "Dog!=DOG", "--subject", "dog=TEXT"], "'dog' is given twice"),
        (["generate", "a dog", "--subject", "!!=DOG"], "is empty"),
        (["generate", "a dog", "--subject", "dog=NOEMB"], "subject embedding file"),
        (["generate", "a dog", "--edge", "MISSING"], "edge image file"),
        (["generate", "a dog", "--edge", "TEXT"], "not an image"),
        (["generate", "a dog", "--subject", "dog=DOG", "--model", "TEXTONLY"], "subjects need a λ-ECLIPSE prior"),
        (["generate", "a dog", "--height", "18"], "--height must be a positive multiple of 4 px"),
        (["generate", "a dog", "--width", "0"], "--width must be a positive whole number"),
        (["generate", "a dog", "-n", "0"], "-n must be a positive whole number"),
        # Model-independent mistakes are found before any model loads (this --model would fail to load).
        (["generate", "a dog", "--steps", "0", "--model", "NOWHERE"], "--steps must be"),
        (["generate", "a dog", "--subject", "cat=DOG", "--model", "NOWHERE"], "does not occur"),
        (["generate", "a dog", "--subject", "dog=MISSING", "--model", "NOWHERE"], "does not exist"),
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
def test_user_errors_are_one_line_and_write_nothing(args, message, model_dir, text_only_dir, dog_png, tmp_path, capsys):
    text, truncated = bad_files(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "nowhere").mkdir()
    subs = {"MISSING": str(tmp_path / "missing.png"), "DOG": str(dog_png), "TEXT": str(text), "TRUNC": str(truncated),
            "AFILE": str(tmp_path / "afile"), "NOWHERE": str(tmp_path / "nowhere"),
            "NOEMB": str(tmp_path / "none.safetensors"), "TEXTONLY": str(text_only_dir)}
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


def test_generate_is_a_function_that_decodes_each_image_once(model_dir, dog_png, tmp_path, monkeypatch):
    opened = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    edge = tmp_path / "edge.png"
    Image.new("RGB", (32, 32), "white").save(edge)
    monkeypatch.setattr(Image, "open", counting_open)
    written = generate(GenerateArgs("a dog on the beach", subjects={"dog": str(dog_png)}, edge=str(edge), num_images=2,
                                    steps=1, model=str(model_dir), out=str(tmp_path / "o"), progress=False))
    assert [p.parent for p in written] == [tmp_path / "o"] * 2 and [p.name[-10:] for p in written] == ["-seed0.png", "-seed1.png"]
    assert all(path.is_file() for path in written)
    # checked and decoded once by the CLI; the pipeline gets the PIL images, not the paths
    assert sorted(opened) == sorted([str(dog_png), str(edge)])


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["miniworld", "eval", "--help"]])
def test_help_imports_neither_torch_nor_diffusers(argv):
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "lambda_eclipse.cli", *argv],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: lambda-eclipse")
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert {"argparse", "lambda_eclipse", "lambda_eclipse.errors"} <= imported  # the log lists what was imported
    assert sorted(m for m in imported if m.split(".")[0] in {"torch", "diffusers", "transformers"}) == []


def test_package_names_resolve_lazily():
    expected = {"LambdaEclipsePipeline": "pipeline", "LambdaEclipsePipelineOutput": "pipeline",
                "LambdaEclipsePriorOutput": "pipeline", "LambdaEclipsePrior": "prior", "UserError": "errors",
                "bind_subjects": "conditioning", "interleave_prompts": "conditioning",
                "locate_subject_tokens": "conditioning", "subject_token_index": "conditioning"}
    assert sorted(lambda_eclipse.__all__) == sorted(expected)
    for name, module in expected.items():
        assert getattr(lambda_eclipse, name) is getattr(importlib.import_module(f"lambda_eclipse.{module}"), name)
        assert name in dir(lambda_eclipse)
    assert lambda_eclipse.encoders is encoders
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        lambda_eclipse.nothing


def test_default_model_is_package_data_then_env_then_hub(monkeypatch, tmp_path):
    from lambda_eclipse import hub, pipeline

    monkeypatch.delenv("LAMBDA_ECLIPSE_MODEL", raising=False)
    assert cli_module.BUNDLED_MODEL == PACKAGE / "models" / "miniworld"
    assert default_model() == str(PACKAGE / "models" / "miniworld")
    assert (PACKAGE / "models" / "miniworld" / "model_index.json").is_file()
    assert (PACKAGE / "models" / "miniworld-oracle" / "oracle.json").is_file()
    if (ROOT / "models").is_symlink():  # a checkout: the documented models/miniworld is the package data
        assert os.readlink(ROOT / "models") == "src/lambda_eclipse/models"
        assert (ROOT / "models" / "miniworld").resolve() == PACKAGE / "models" / "miniworld"
    monkeypatch.setenv("LAMBDA_ECLIPSE_MODEL", str(tmp_path))
    assert default_model() == str(tmp_path)
    monkeypatch.delenv("LAMBDA_ECLIPSE_MODEL")
    monkeypatch.setattr(cli_module, "BUNDLED_MODEL", tmp_path / "absent")
    assert default_model() == hub.DEFAULT_PRIOR == pipeline.DEFAULT_PRIOR == "ECLIPSE-Community/Lambda-ECLIPSE-Prior-v1.0"
    assert not hasattr(cli_module, "HUB_MODEL")  # one constant for the Hub prior


def test_miniworld_eval_flags_reach_the_evaluation(monkeypatch, tmp_path, capsys):
    from lambda_eclipse.miniworld import evaluate

    seen = {}

    def fake_eval(model_dir, oracle_path, out_dir, num_prompts, seed, priors, config):
        seen.update(model=model_dir, oracle=oracle_path, out=out_dir, num_prompts=num_prompts, seed=seed,
                    priors=priors, config=config)
        return {"ok": True}

    monkeypatch.setattr(evaluate, "run_miniworld_eval", fake_eval)
    out = tmp_path / "eval"
    assert main(["miniworld", "eval", "--out", str(out), "--num-prompts", "3", "--seed", "5", "--steps", "2",
                 "--guidance", "3.5", "--images-per-prompt", "1", "--threads", "2", "--prior", "λ=0.5=runs/p"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "metrics.md")
    config = seen.pop("config")
    assert seen == {"model": str(cli_module.BUNDLED_MODEL), "oracle": str(cli_module.BUNDLED_ORACLE), "out": str(out),
                    "num_prompts": 3, "seed": 5, "priors": {"λ=0.5": "runs/p"}}
    assert (config.num_inference_steps, config.guidance_scale, config.images_per_prompt, config.threads) == (2, 3.5, 1, 2)
    seen.clear()
    assert main(["miniworld", "eval", "--out", str(out), "--prior", "no-equals-sign"]) == 2
    assert "LABEL=DIR" in capsys.readouterr().err and seen == {}  # refused before the evaluation runs


def test_colour_unet_refuses_a_folder_without_components(tmp_path, capsys):
    assert main(["miniworld", "colour-unet", "--model", str(tmp_path / "empty"), "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "lacks unet, movq, image_encoder/" in err and "Traceback" not in err and not (tmp_path / "w").exists()


def test_writes_go_through_the_atomic_helper():
    for name, helper in (("cli.py", "save_png"), ("pipeline.py", "atomic_path"), ("outputs.py", "write_new_file")):
        source = (PACKAGE / name).read_text()
        assert "os.replace" not in source and helper in source, name


@pytest.mark.parametrize("flag, value", [("--subject-scale", "3"), ("--edge-strength", "nan")])
def test_control_errors_name_the_flag(flag, value, capsys):
    assert cli("generate", "a dog", flag, value) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag} must be a number in [0, 2]" in err
