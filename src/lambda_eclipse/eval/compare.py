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
    metrics = json.loads(file.read_text())
    return label, miniworld_as_run(metrics) if "conditions" in metrics else metrics


def miniworld_as_run(m: dict) -> dict:
    """A miniworld evaluation's metrics in the harness's shape: one kind per condition and per swept prior
    ("with_subjects λ=0.2"), every metric's all-bucket mean; DINO is the DINO-like feature to the subject."""
    def kind(per: dict) -> dict:
        out = {k: v["all"] for k, v in per.items() if "all" in v}
        for ours, theirs in (("dino", "dino_subject"), ("clip_i", "clip_i_subject")):
            if theirs in out:
                out[ours] = out[theirs]
        return out

    overall = {c: kind(per) for c, per in m["conditions"].items()}
    overall.update({f"with_subjects {label}": kind(s["metrics"]) for label, s in (m.get("lambda_sweep") or {}).items()})
    return {"suite": "miniworld", "model": m.get("model", "?"), "overall": overall,
            "images": m.get("images_per_condition"), "judges": {"oracle": m.get("oracle")}}


def compare_runs(specs: list[str], out: str | Path | None = None) -> str:
    """The Markdown table of ``specs`` (one row per run and kind); with ``out`` also writes compare.md and
    compare.png there. Runs of different suites are refused (their numbers do not compare)."""
    if len(specs) < 1:
        raise UserError("give at least one run folder to compare")
    runs = [load_run(s) for s in specs]
    suites = {r["suite"] for _, r in runs}
    if len(suites) > 1:
        raise UserError(f"these runs are of different suites ({', '.join(sorted(suites))}); compare runs of one suite")
    # the oracle's headline metrics too, where a run has them (the miniature world)
    metrics = [m for m in (*METRICS, "colour", "subject_found")
               if any(m in per for _, r in runs for per in r["overall"].values())]
    lines = [f"# {suites.pop()}: {len(runs)} runs", "",
             "| run | kind | model | " + " | ".join(LABELS.get(m, m) for m in metrics) + " | images |",
             "|---|---|---|" + "---|" * (len(metrics) + 1)]
    series = {}
    for label, r in runs:
        for kind, per in r["overall"].items():
            cells = [f"{per[m]['mean']:.4f}" if m in per else "–" for m in metrics]
            lines.append(f"| {label} | {kind} | `{r['model']}` | " + " | ".join(cells) + f" | {r['images']} |")
        for kind, per in r["overall"].items():
            if kind == "all" or len(r["overall"]) == 1 or r["suite"] == "miniworld" and kind.startswith("with_subjects"):
                series[label if kind in ("all", "with_subjects") else f"{label} {kind}"] = {
                    m: v["mean"] for m, v in per.items()}
    judges = {json.dumps(r["judges"], sort_keys=True) for _, r in runs}
    if len(judges) > 1:
        lines += ["", "**Note:** these runs were scored with different judges; their numbers are not comparable."]
    text = "\n".join(lines) + "\n"
    if out is not None:
        atomic_write(Path(out) / "compare.md", text)
        bar_plot(Path(out) / "compare.png", series, "runs compared")
    return text
