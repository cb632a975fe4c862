"""Several scored runs side by side (a λ sweep, fine-tuned vs not, subject scales): one table and one plot."""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_write
from ..errors import UserError
from .reports import LABELS, bar_plot
from .scoring import METRICS


def load_run(spec: str) -> tuple[str, dict]:
    """``DIR`` or ``LABEL=DIR`` (split at the last '=', so "λ=0.2=runs/x" keeps its label) -> (label, metrics)."""
    label, sep, path = spec.rpartition("=")
    if not sep:
        label, path = Path(spec).name, spec
    file = Path(path) / "metrics.json"
    if not file.is_file():
        raise UserError(f"{path!r} holds no scored run (metrics.json); give a folder written by `evaluate`")
    return label, json.loads(file.read_text())


def compare_runs(specs: list[str], out: str | Path | None = None) -> str:
    """The Markdown table of ``specs`` (one row per run and kind); with ``out`` also writes compare.md and
    compare.png there. Runs of different suites are refused (their numbers do not compare)."""
    if len(specs) < 1:
        raise UserError("give at least one run folder to compare")
    runs = [load_run(s) for s in specs]
    suites = {r["suite"] for _, r in runs}
    if len(suites) > 1:
        raise UserError(f"these runs are of different suites ({', '.join(sorted(suites))}); compare runs of one suite")
    metrics = [m for m in METRICS if any(m in per for _, r in runs for per in r["overall"].values())]
    lines = [f"# {suites.pop()}: {len(runs)} runs", "",
             "| run | kind | model | " + " | ".join(LABELS[m] for m in metrics) + " | images |",
             "|---|---|---|" + "---|" * (len(metrics) + 1)]
    series = {}
    for label, r in runs:
        for kind, per in r["overall"].items():
            cells = [f"{per[m]['mean']:.4f}" if m in per else "–" for m in metrics]
            lines.append(f"| {label} | {kind} | `{r['model']}` | " + " | ".join(cells) + f" | {r['images']} |")
        kind = "all" if "all" in r["overall"] else next(iter(r["overall"]))
        series[label] = {m: v["mean"] for m, v in r["overall"][kind].items()}
    judges = {json.dumps(r["judges"], sort_keys=True) for _, r in runs}
    if len(judges) > 1:
        lines += ["", "**Note:** these runs were scored with different judges; their numbers are not comparable."]
    text = "\n".join(lines) + "\n"
    if out is not None:
        atomic_write(Path(out) / "compare.md", text)
        bar_plot(Path(out) / "compare.png", series, "runs compared (kind 'all')")
    return text
