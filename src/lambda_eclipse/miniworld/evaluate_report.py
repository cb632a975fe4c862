"""Reports of the miniature-world evaluation: the Markdown tables and the image grid."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..atomic import atomic_path
from .scenes import Scene

CONDITION_LABELS = {
    "render": "render (judge ceiling)", "gt_embedding": "GT embedding (decoder)", "text_only": "text only",
    "with_subjects": "with subjects", "image_only": "image only",
}
GRID_LABELS = {"render": "render", "gt_embedding": "GT embedding", "text_only": "text only",
               "with_subjects": "with subjects", "image_only": "image only"}
CONCEPT = {
    "subject_found": "subject's shape found",
    "colour": "colour right (found & colour)",
    "texture": "texture right (found & texture)",
    "colour_and_texture": "colour and texture right",
    "all_colours_right": "all subjects' colours right (≥2 subjects)",
    "clip_i_subject": "CLIP-I vs subject crop",
    "clip_i_render": "CLIP-I vs GT render",
    "dino_subject": "DINO-like vs subject crop †",
    "dino_render": "DINO-like vs GT render †",
}
COMPOSITION = {
    "background_colour": "background colour right",
    "background_kind": "background kind right",
    "relation": "relation right (both found)",
    "clip_t": "CLIP-T (prompt)",
    "clip_t_full_caption": "CLIP-T (full caption)",
}
BREAKDOWN = ("colour", "texture", "all_colours_right", "clip_i_subject", "background_colour", "relation", "clip_t")
FIDELITY = {
    "shape_f1": "shape presence F1", "colour_accuracy": "colour (given the object)",
    "colour_swapped": "colour of another object in the scene (≥2 objects)",
    "texture_accuracy": "texture (given the object)", "size_accuracy": "size (given the object)",
    "background_colour_accuracy": "background colour", "background_kind_accuracy": "background kind",
    "relation_accuracy": "relation (from centres)", "scene_exact_accuracy": "whole scene exact",
    "centre_error_px": "centre error (px)",
}


def _cell(entry: dict | None, bucket: str = "all") -> str:
    if not entry or bucket not in entry:
        return "–"
    return f"{entry[bucket]['mean']:.3f} ({entry[bucket]['n']})"


def write_markdown(metrics: dict) -> str:
    """The Markdown report of a :func:`~lambda_eclipse.miniworld.evaluate.run_miniworld_eval` result.
    Every cell is "value (number of items it averages over)": images, subjects or relations."""
    cfg, cond = metrics["config"], metrics["conditions"]
    names = [c for c in CONDITION_LABELS if c in cond]
    by = metrics["prompts_by_subjects"]
    lines = [
        "# Miniature-world evaluation", "",
        (f"{metrics['num_prompts']} held-out prompts ({by['1']} / {by['2']} / {by['3']} with 1 / 2 / 3 subjects), "
         f"{cfg['images_per_prompt']} images each = {metrics['images_per_condition']} images per condition; "
         f"{cfg['scheduler'].upper()} {cfg['num_inference_steps']} steps, guidance {cfg['guidance_scale']}, "
         f"{cfg['size']} px, seed {cfg['seed']}. Prompts are appearance-free, so colour and texture can only come "
         "from the subject images. Cells: value (number of items)."), "",
        "† DINO-like: cosine of the tiny CLIP vision encoder's unprojected pooled CLS state (no DINO model offline).",
        "Image only: the mean of the subject crops' CLIP embeddings decoded directly (no prompt).", "",
    ]
    if metrics.get("oracle_movq_matches") is False:
        lines += ["**Warning:** the oracle was trained on another MoVQ's reconstructions; retrain it for this model.", ""]
    for title, rows in (("Concept alignment", CONCEPT), ("Composition alignment", COMPOSITION)):
        lines += [f"## {title}", "", "| metric | " + " | ".join(CONDITION_LABELS[c] for c in names) + " |",
                  "|---|" + "---|" * len(names)]
        lines += [f"| {label} | " + " | ".join(_cell(cond[c].get(m)) for c in names) + " |" for m, label in rows.items()]
        lines.append("")
    shown = [c for c in ("text_only", "with_subjects", "image_only") if c in cond]
    lines += ["## By number of subjects", "", "| subjects | metric | " + " | ".join(CONDITION_LABELS[c] for c in shown)
              + " |", "|---|---|" + "---|" * len(shown)]
    for b in ("1", "2", "3"):
        for m in BREAKDOWN:
            if not any(b in cond[c].get(m, {}) for c in shown):
                continue
            label = "both subjects' colours right" if (m == "all_colours_right" and b == "2") else \
                {**CONCEPT, **COMPOSITION}[m]
            lines.append(f"| {b} | {label} | " + " | ".join(_cell(cond[c].get(m), b) for c in shown) + " |")
    lines.append("")
    fid = metrics.get("decoder_fidelity", {})
    if fid:
        cols = list(fid)
        lines += ["## Decoder fidelity (oracle read, appearance given the true object's shape)", "",
                  "| metric | " + " | ".join(CONDITION_LABELS[c] for c in cols) + " |", "|---|" + "---|" * len(cols)]
        found = sorted({k for c in cols for k in fid[c] if k.startswith("found_")})  # which shapes get drawn
        rows = {**FIDELITY, **{k: f"{k.removeprefix('found_')} found" for k in found}}
        lines += [f"| {label} | " + " | ".join(f"{fid[c][k]:.3f}" if k in fid[c] else "–" for c in cols) + " |"
                  for k, label in rows.items()]
        lines += ["| images / objects / relations | " + " | ".join(
            f"{fid[c]['n_images']} / {fid[c]['n_objects']} / {fid[c]['n_relations']}" for c in cols) + " |", ""]
    sweep = metrics.get("lambda_sweep") or {}
    if sweep:
        keys = ("colour", "texture", "colour_and_texture", "all_colours_right", "clip_i_subject", "dino_subject",
                "background_colour", "relation", "clip_t")
        lines += ["## λ sweep (with subjects)", "", "| prior | " + " | ".join({**CONCEPT, **COMPOSITION}[k] for k in keys)
                  + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {label} | " + " | ".join(_cell(s["metrics"].get(k)) for k in keys) + " |"
                  for label, s in sweep.items()]
        lines.append("")
    t = metrics["timing"]
    lines += ["## Timing", "", (f"{t['images_decoded']} images decoded in {t['total_s']:.1f} s on {t['threads']} "
                                f"thread(s): {t['seconds_per_100_images']:.1f} s per 100 images "
                                "(prior, decoder, CLIP and oracle included)."), ""]
    return "\n".join(lines)


def _drawable(text: str) -> str:
    """``text`` in what PIL's default font draws: it has no Greek, so the sweep's "λ=0.2" would print as a box."""
    return text.replace("λ", "lambda").encode("latin-1", "replace").decode("latin-1")


def write_grid(path: str | os.PathLike, scenes: list[Scene], images: dict[str, np.ndarray], ipp: int,
               rows: int = 8, tile: int = 96) -> Path:
    """One row per prompt (its first image per condition): the render, every condition, then the subject crops
    at half size, and the prompt. ``images``: condition -> uint8 (N·ipp, S, S, 3)."""
    rows = min(rows, len(scenes))
    columns = list(images)
    size = scenes[0].size
    scale = max(1, tile // size)
    t = size * scale
    text_w, header = 560, 14
    canvas = Image.new("RGB", ((len(columns) + 1) * (t + 4) + text_w, header + rows * (t + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns + ["subjects"]):
        label = _drawable(GRID_LABELS.get(name, name.replace("with_subjects ", "")))
        draw.text((c * (t + 4) + 2, 1), label[: t // 6], fill="black")
    for r in range(rows):
        y = header + r * (t + 4)
        for c, name in enumerate(columns):
            img = Image.fromarray(images[name][r * ipp]).resize((t, t), Image.Resampling.NEAREST)
            canvas.paste(img, (c * (t + 4), y))
        half = t // 2
        for k, obj in enumerate(scenes[r].objects):  # up to 3 crops in a 2 × 2 block
            crop = Image.fromarray(obj.crop).resize((half, half), Image.Resampling.NEAREST)
            canvas.paste(crop, (len(columns) * (t + 4) + (k % 2) * half, y + (k // 2) * half))
        draw.text(((len(columns) + 1) * (t + 4) + 4, y + t // 2 - 6), _drawable(scenes[r].captions["appearance_free"]),
                  fill="black")
    with atomic_path(path) as temporary:
        canvas.save(temporary, format="PNG")
    return Path(path)
