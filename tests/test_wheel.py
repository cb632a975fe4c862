"""Installed from a wheel, away from the checkout, `lambda-eclipse generate` works with the bundled model.

Builds the wheel offline (no build isolation, no index), installs it into a fresh venv that reuses this
environment's dependencies, and runs the README's generate command from a folder outside the checkout.
About 12 s on 2 CPU cores (mostly the venv's pip and a fresh torch import), so it stays in the fast tier.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README_PROMPT = "a photo of a ball left of a paper plane over a teal grid background"


def run(command, **kwargs):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command[:3]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


@pytest.mark.slow  # a whole build or install: the slow tier (CI runs it)
def test_wheel_install_generates_with_the_bundled_model(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    # Build from a copy: an in-tree build would write build/ and egg-info into the checkout that others share.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", dist,
         source])
    (wheel,) = dist.glob("lambda_eclipse-*.whl")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", venv])
    run([venv / "bin" / "pip", "install", "--no-deps", "--no-index", "-q", wheel])

    outside = tmp_path / "elsewhere"  # a working folder with no models/ and no src/ in reach
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LAMBDA_ECLIPSE_MODEL")}
    env["HF_HUB_OFFLINE"] = "1"
    located = run([venv / "bin" / "python", "-c", "import lambda_eclipse; print(lambda_eclipse.__file__)"],
                  cwd=outside, env=env).stdout.strip()
    assert Path(located).is_relative_to(venv) and not Path(located).is_relative_to(ROOT)

    out = tmp_path / "out"
    run([venv / "bin" / "lambda-eclipse", "generate", README_PROMPT, "--subject", f"ball={ROOT / 'examples' / 'ball.png'}",
         "-n", 1, "--steps", 2, "--out", out, "--quiet"], cwd=outside, env=env)
    (png,) = out.glob("*.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 0
        model = json.loads(image.text["settings"])["model"]
    assert Path(model).is_relative_to(venv) and Path(model).name == "miniworld"  # the wheel's own bundle
