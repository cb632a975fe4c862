"""Reports of a scored run: metrics.json, a Markdown table with the paper's rows beside ours, a per-subject CSV,
a bar plot of ours vs the paper, and image grids (subject picture | the images of each prompt)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..atomic import atomic_path, atomic_write
from .scoring import METRICS

LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}

# The paper's reported figures (arXiv 2402.05195 v2), per suite: row label -> {metric: value}, and which of our
# kinds each row is comparable with.
PAPER = {
    "dreambench": {"table": "Table 2 (DreamBench)", "kind": "all", "rows": {
        "λ-ECLIPSE* (Kv2.2, 34M prior, zero-shot)": {"dino": 0.613, "clip_i": 0.783, "clip_t": 0.307},
        "λ-ECLIPSE* (concept-specific fine-tuned decoder)": {"dino": 0.682, "clip_i": 0.796, "clip_t": 0.304},
        "BLIP-Diffusion* (SDv1.5, zero-shot)": {"dino": 0.603, "clip_i": 0.793, "clip_t": 0.291},
        "IP-Adapter* (SDXL)": {"dino": 0.613, "clip_i": 0.810, "clip_t": 0.292},
        "Kosmos-G* (SDv1.5)": {"dino": 0.618, "clip_i": 0.822, "clip_t": 0.250},
        "Emu2* (SDXL)": {"dino": 0.563, "clip_i": 0.765, "clip_t": 0.273},
        "DreamBooth (SDv1.5, fine-tuned)": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
    }},
    "multibench": {"table": "Table 4 (Multibench)", "kind": None, "rows": {
        "λ-ECLIPSE, 2 subjects": {"dino": 0.4478, "clip_i": 0.7409, "clip_t": 0.3327, "kind": "2 subjects"},
        "λ-ECLIPSE, 3 subjects": {"dino": 0.3420, "clip_i": 0.6463, "clip_t": 0.3469, "kind": "3 subjects"},
        "Kosmos-G, 2 subjects": {"dino": 0.4549, "clip_i": 0.7759, "clip_t": 0.2493, "kind": "2 subjects"},
        "Emu2, 2 subjects": {"dino": 0.4451, "clip_i": 0.7397, "clip_t": 0.2673, "kind": "2 subjects"},
        "Emu2, 3 subjects": {"dino": 0.3168, "clip_i": 0.6231, "clip_t": 0.2819, "kind": "3 subjects"},
    }},
    "dreambench-canny": {"table": "Table 5 (Canny-controlled DreamBench; DINO drop vs Table 2)", "kind": "with edges",
                         "rows": {
        "λ-ECLIPSE*": {"dino": 0.5173, "clip_i": 0.7437, "clip_t": 0.3158, "dino_drop": 0.143},
        "BLIP-Diffusion*": {"dino": 0.4234, "clip_i": 0.7119, "clip_t": 0.3152, "dino_drop": 0.297},
        "IP-Adapter*": {"dino": 0.4281, "clip_i": 0.7315, "clip_t": 0.3034, "dino_drop": 0.319},
    }},
}


def dino_drop(overall: dict) -> float | None:
    """Relative DINO drop of the edge-controlled images against the same prompts without edges (Table 5)."""
    try:
        with_edges, without = overall["with edges"]["dino"]["mean"], overall["without edges"]["dino"]["mean"]
    except KeyError:
        return None
    return 1 - with_edges / without if without else None


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def markdown(result: dict) -> str:
    """The suite's Markdown report: our rows (per kind) above the paper's."""
    suite, overall = result["suite"], result["overall"]
    gen, judges = result["generation"], result["judges"]
    metrics = [m for m in (*METRICS, *sorted({m for k in overall.values() for m in k} - set(METRICS)))
               if any(m in k for k in overall.values())]
    paper = PAPER.get(suite)
    lines = [f"# {suite} evaluation", "",
             f"Model `{result['model']}`; {gen['scheduler'].upper()} {gen['steps']} steps, guidance {gen['guidance']}, "
             f"{gen['images_per_prompt']} images per prompt, seeds {gen['seed']}..{gen['seed'] + gen['images_per_prompt'] - 1}. "
             f"Judges: DINO `{judges['dino']}`, CLIP `{judges['clip']}` ({judges['convention']}). Subjects: "
             f"{result['subject_preparation']}. Cells: mean (prompts).", ""]
    extra = ["DINO drop"] if suite == "dreambench-canny" else []
    lines += ["| run | " + " | ".join(LABELS.get(m, m) for m in metrics) + " | " + " | ".join(extra) + " |"
              if extra else "| run | " + " | ".join(LABELS.get(m, m) for m in metrics) + " |",
              "|---|" + "---|" * (len(metrics) + len(extra))]
    drop = dino_drop(overall)
    for kind, per in overall.items():
        cells = [f"{per[m]['mean']:.4f} ({per[m]['n']})" if m in per else "–" for m in metrics]
        if extra:
            cells.append(f"{100 * drop:.1f}%" if drop is not None and kind == "with edges" else "–")
        lines.append(f"| **ours**, {kind} | " + " | ".join(cells) + " |")
    if paper:
        for label, row in paper["rows"].items():
            cells = [_fmt(row.get(m)) for m in metrics]
            if extra:
                cells.append(f"{100 * row['dino_drop']:.1f}%")
            lines.append(f"| paper: {label} | " + " | ".join(cells) + " |")
        lines += ["", f"Paper rows: {paper['table']} of λ-ECLIPSE (arXiv 2402.05195 v2), as printed."]
    for key, note in result.get("notes", {}).items():
        lines.append(f"- {key}: {note}")
    t = result.get("timing", {})
    if t.get("made"):
        lines += ["", f"Generation in this invocation: {t['made']} images in {t['seconds']:.1f} s "
                      f"({t['seconds'] / t['made']:.3f} s per image, {t.get('device', '?')})."]
    return "\n".join(lines) + "\n"


def per_subject_csv(result: dict) -> str:
    """One row per subject: its mean metrics."""
    per = result["per_subject"]
    metrics = sorted({m for v in per.values() for m in v}, key=lambda m: (m not in METRICS, m))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["subject", *metrics])
    for sid, values in per.items():
        writer.writerow([sid, *(f"{values[m]:.6f}" if m in values else "" for m in metrics)])
    return buffer.getvalue()


def bar_plot(path: Path, series: dict[str, dict[str, float]], title: str) -> Path:
    """Grouped bars: one group per metric, one bar per series (ours, the paper's rows or several runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if any(m in s for s in series.values())]
    fig, ax = plt.subplots(figsize=(1.8 + 1.9 * len(metrics), 3.6))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(metrics))]
        ax.bar(xs, [values.get(m, 0.0) for m in metrics], width, label=label)
    ax.set_xticks(range(len(metrics)), [LABELS[m] for m in metrics])
    ax.set_ylabel("cosine")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", dpi=110)
    plt.close(fig)
    return path


def grid(path: Path, reference, rows: list[tuple[str, list]], tile: int = 128) -> Path:
    """A grid: the subject picture, then one row per prompt of its images, captioned with the prompt."""
    from PIL import Image, ImageDraw

    columns = 1 + max(len(images) for _, images in rows)
    caption = 14
    canvas = Image.new("RGB", (columns * (tile + 4), len(rows) * (tile + 4 + caption)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (prompt, images) in enumerate(rows):
        y = r * (tile + 4 + caption)
        draw.text((2, y), prompt.encode("latin-1", "replace").decode("latin-1")[: columns * tile // 6], fill="black")
        for c, image in enumerate(([reference] if reference is not None else [None]) + list(images)):
            if image is not None:
                canvas.paste(image.convert("RGB").resize((tile, tile)), (c * (tile + 4), y + caption))
    with atomic_path(path) as temporary:
        canvas.save(temporary, format="PNG")
    return path


def write_reports(out: Path, result: dict, suite, cfg, grid_prompts: int = 6) -> dict[str, Path]:
    """Write metrics.json, metrics.md, per_subject.csv, plot.png and grids/<subject>.png into ``out``."""
    from ..encoders import load_image
    from .runner import image_path

    written = {"json": atomic_write(out / "metrics.json", json.dumps(result, indent=2, ensure_ascii=False)),
               "markdown": atomic_write(out / "metrics.md", markdown(result)),
               "csv": atomic_write(out / "per_subject.csv", per_subject_csv(result))}
    series = {f"ours ({k})": {m: v["mean"] for m, v in per.items()} for k, per in result["overall"].items()
              if k != "all" or len(result["overall"]) == 1}
    paper = PAPER.get(result["suite"])
    for label, row in (paper["rows"].items() if paper else []):
        if label.startswith("λ-ECLIPSE"):
            series[f"paper: {label}"] = row
    written["plot"] = bar_plot(out / "plot.png", series, f"{result['suite']}: ours vs the paper")
    by_subject: dict[str, list] = {}
    for job in result["jobs_scored"]:
        by_subject.setdefault(job["subjects"][0] if job["subjects"] else "", []).append(job)
    for sid, jobs in by_subject.items():
        if not sid:
            continue
        rows = []
        for job in jobs[:grid_prompts]:
            spec = next(j for j in suite.jobs if j.key == job["key"])
            rows.append((spec.prompt, [load_image(image_path(out, spec, k, cfg)) for k in range(spec.images)]))
        reference = load_image(suite.subjects[sid].condition_image)
        grid(out / "grids" / f"{sid}.png", reference, rows)
    written["grids"] = out / "grids"
    return written
