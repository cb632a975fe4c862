"""The miniworld interpolation evaluation: its helpers (fast) and one tiny run on the bundled model (slow)."""

import json

import numpy as np
import pytest

from lambda_eclipse.miniworld.interpolation_eval import (
    InterpolationEvalConfig, direction_changes, other_colour, run_interpolation_eval, subject_picture,
)


def test_helpers():
    assert direction_changes(np.array([0, 0, 0.5, 1, 1])) == 0
    assert direction_changes(np.array([0, 0.6, 0.2, 1])) == 2
    assert direction_changes(np.array([0, 0.01, 0, 1])) == 0  # steps under the tolerance carry no direction
    assert other_colour("red") == "blue" and other_colour(other_colour("pink")) == "pink"
    red, blue = (np.asarray(subject_picture("ball", c, "plain", 32)) for c in ("red", "blue"))
    assert red.shape == (32, 32, 3) and red[16, 16, 0] > 150 and blue[16, 16, 2] > 150


@pytest.mark.slow
def test_a_tiny_run_writes_its_report(tmp_path):
    from lambda_eclipse.cli import BUNDLED_MODEL, BUNDLED_ORACLE

    cfg = InterpolationEvalConfig(num_lines=1, frames=3, num_prompts=1, images_per_prompt=1, scales=(0.0, 1.0),
                                  pictures=2, grid_steps=2, num_inference_steps=2)
    metrics = run_interpolation_eval(BUNDLED_MODEL, BUNDLED_ORACLE, tmp_path, cfg)
    assert metrics["grid"]["corners_bitwise_equal_to_generate"] == [True] * 4
    assert metrics["lines"]["slerp"]["lines"] == 1 and len(metrics["lines"]["lerp"]["found_by_frame"]) == 3
    perceptual = json.loads((tmp_path / "parts" / "lines-slerp-perceptual.json").read_text())
    assert metrics["lines"]["slerp, perceptual spacing"]["lines"] == 1 and perceptual["records"][0]["positions"][-1] == 1
    assert set(metrics["knobs"]["subject_scale_colour_accuracy"]) == {"0.0", "1.0"}
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "lines.png").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["ramp"]["rendered"]["lines"] == 1
    again = run_interpolation_eval(BUNDLED_MODEL, BUNDLED_ORACLE, tmp_path, cfg)  # resumes from parts/
    assert again["knobs"] == metrics["knobs"]
