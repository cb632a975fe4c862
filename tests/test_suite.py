"""The performance suite runs end to end (tiny sizes here; `--quick` and the full sizes are the slow tier)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import suite

ROOT = Path(__file__).resolve().parents[1]


def test_suite_measures_every_section_and_writes_json_and_table(tmp_path):
    report = suite.main(["--device", "cpu", "--tiny", "--in-process", "--threads", "1", "--out", str(tmp_path),
                         "--work", str(tmp_path / "work")])
    saved = json.loads((tmp_path / "cpu-tiny.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    results = saved["results"]
    assert not [row for rows in results.values() for row in rows if "error" in row]
    assert [row["mode"] for row in results["generation"]] == ["resident", "prior-then-decoder"]
    assert all(row["seconds_per_image"] > 0 and row["height"] == 64 for row in results["generation"])
    lora, full = results["unet_train"]
    assert lora["method"] == "lora" and 0 < lora["trainable_params"] < full["trainable_params"]
    assert results["prior_train"][0]["flops_per_step"] > 0
    table = (tmp_path / "cpu-tiny.md").read_text()
    assert "| prior-then-decoder | 1 | 2 |" in table and "| lora |" in table


@pytest.mark.slow
def test_quick_suite_runs_in_subprocesses(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "suite.py"), "--device", "cpu", "--quick", "--out",
                    str(tmp_path), "--work", str(tmp_path / "work"), "--threads", "1"], check=True, env=env, timeout=900)
    results = json.loads((tmp_path / "cpu-quick.json").read_text())["results"]
    assert not [row for rows in results.values() for row in rows if "error" in row]
    assert all(row["isolated"] and row["peak_rss_bytes"] > 0 for rows in results.values() for row in rows)
