"""The build's final report: report.json, report.md and samples.png (image, boxes, masks, crops, caption)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path, atomic_write
from .records import read_shard
from .stages import STAGES


def summarize(work) -> dict[str, Any]:
    """Images in and out, unreadable inputs, drops per rule, subjects per image, throughput per stage."""
    stats = work.manifest["stats"]
    drops: Counter = Counter()
    throughput = {}
    for stage in STAGES:
        shards = stats.get(stage, {}).values()
        seconds, images = sum(s["seconds"] for s in shards), sum(s["images"] for s in shards)
        for s in shards:
            drops.update(s["drops"])
        throughput[stage] = {"images": images, "seconds": round(seconds, 3),
                             "images_per_s": round(images / seconds, 3) if seconds else None}
    unreadable, subjects = [], Counter()
    for shard in range(len(work.shards)):
        for r in read_shard(work.shard_path("features", shard)):
            if r.dropped.startswith("unreadable"):
                unreadable.append({"source_id": r.source_id, "reason": r.dropped.partition(": ")[2]})
            elif not r.dropped:
                subjects[len(r.boxes)] += 1
    filter_rules = {rule: drops.get(rule, 0) for rule in _rules()}
    return {
        "images_in": len(work.refs), "images_out": sum(subjects.values()), "unreadable": unreadable,
        "subjects_per_image": {str(k): subjects[k] for k in sorted(subjects)},
        "drops": {"filter": filter_rules, "no_caption": drops.get("no_caption", 0), "binding": drops.get("binding", 0)},
        "throughput": throughput, "models": work.manifest["config"]["models"], "fingerprints": work.fingerprints,
    }


def _rules() -> tuple[str, ...]:
    from .filters import RULES

    return RULES


def markdown(summary: dict[str, Any]) -> str:
    from .filters import BOX_RULES

    lines = ["# Dataset build report", "",
             f"- images in: {summary['images_in']}", f"- images out (feature samples): {summary['images_out']}",
             f"- unreadable inputs skipped: {len(summary['unreadable'])}",
             f"- dropped with no caption: {summary['drops']['no_caption']}; "
             f"dropped by the binding checks: {summary['drops']['binding']}", "",
             "## Subjects per image", "", "| subjects | images |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["subjects_per_image"].items()]
    lines += ["", "## Drops per filter rule", "", "| rule | dropped | unit |", "|---|---|---|"]
    lines += [f"| {rule} | {n} | {'boxes' if rule in BOX_RULES else 'images'} |"
              for rule, n in summary["drops"]["filter"].items()]
    lines += ["", "## Throughput per stage", "", "| stage | images | seconds | images/s |", "|---|---|---|---|"]
    lines += [f"| {stage} | {t['images']} | {t['seconds']} | {t['images_per_s']} |"
              for stage, t in summary["throughput"].items()]
    if summary["unreadable"]:
        lines += ["", "## Unreadable inputs", ""] + [f"- `{u['source_id']}`: {u['reason']}" for u in summary["unreadable"]]
    lines += ["", "Models: " + ", ".join(f"{k}=`{v}`" for k, v in summary["models"].items()), ""]
    return "\n".join(lines)


def marked_caption(caption: str, words: list[str]) -> str:
    """The caption with each bound subject word in brackets and numbered: "a [dog#0] on a [hat#1]"."""
    from ..conditioning import _word_pattern

    out = caption
    for k, word in enumerate(words):
        out = _word_pattern(word).sub(lambda m, k=k: f"[{m.group(0)}#{k}]", out, count=0) if word else out
    return out


def sample_sheet(work, path: Path, count: int) -> None:
    """A PNG grid: per kept record its image with boxes and masks, its subject crops, the marked caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .stages import load_images

    chosen = []
    for shard in range(len(work.shards)):
        masked = {r.source_id: r for r in read_shard(work.shard_path("filter", shard))}
        for r in read_shard(work.shard_path("crop", shard)):
            if not r.dropped and len(chosen) < count:
                chosen.append((r, masked[r.source_id].masks))
    rows = max(len(chosen), 1)
    cols = 1 + max([len(r.crops) for r, _ in chosen] or [1])
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    colors = plt.get_cmap("tab10")
    for row, (record, masks) in enumerate(chosen):
        image = np.asarray(load_images([record], work.by_id, work.config.input.max_pixels)[0]).astype(float) / 255
        for k, mask in enumerate(masks):
            image[mask] = 0.55 * image[mask] + 0.45 * np.array(colors(k)[:3])
        axes[row, 0].imshow(image)
        for k, box in enumerate(record.boxes):
            x0, y0, x1, y1 = box.xyxy
            axes[row, 0].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colors(k), lw=1.5))
        axes[row, 0].set_title(marked_caption(record.caption, record.words)[:60], fontsize=7, loc="left")
        for k, crop in enumerate(record.crops):
            axes[row, 1 + k].imshow(crop)
            axes[row, 1 + k].set_title(f"#{k} {record.boxes[k].word} ({record.boxes[k].score:.2f})", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", dpi=80)
    plt.close(fig)


def write_report(work) -> dict[str, Any]:
    summary = summarize(work)
    atomic_write(work.root / "report.json", json.dumps(summary, indent=2, ensure_ascii=False))
    atomic_write(work.root / "report.md", markdown(summary))
    sample_sheet(work, work.root / "samples.png", work.config.report_samples)
    return summary
