"""Interpolation and the control knobs measured in the miniature world (`lambda-eclipse miniworld interpolation-eval`).

Four measurements, on held-out one-subject scenes (the subject a reserved shape × colour × texture instance) and
the bundled model, judged by the concept oracle:

* **lines**: the scene's appearance-free prompt with its subject word bound to a picture of the subject in colour
  A at one end and in colour B at the other; the frames between (slerp and lerp). Per line: is the subject found
  in every frame; does the oracle's colour reading ``p(B) / (p(A) + p(B))`` move from A to B with at most one
  change of direction; are the CLIP-I steps between neighbouring frames even (largest ≤ 2 × mean).
* **grid**: a two-subject prompt with two pictures per subject (the paper's Figure 7); its corners compared
  bitwise with what `generate` writes for the same seed and settings.
* **subject scale**: colour accuracy (subject found and its colour right) at scales 0, 0.25, 0.5, 0.75, 1.
* **several pictures**: colour accuracy with one picture of the subject vs three (normalized mean).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..atomic import atomic_write
from ..dataset.crop import mask_box, subject_crop
from .draw import paint_object
from .evaluate import EvalConfig, _generators, clip_features, decode
from .scenes import iter_scenes, render_scene
from .vocab import COLOURS

COLOUR_NAMES = list(COLOURS)


@dataclass(frozen=True)
class InterpolationEvalConfig:
    """What one interpolation evaluation generates (same config + model -> same numbers)."""

    num_lines: int = 20  # held-out one-subject scenes, one line each
    frames: int = 7  # frames per line, ends included
    num_prompts: int = 16  # one-subject scenes for the subject-scale curve and the several-pictures comparison
    images_per_prompt: int = 2
    scales: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    pictures: int = 3  # pictures per subject in the several-pictures condition
    grid_steps: int = 5
    seed: int = 0
    num_inference_steps: int = 20
    guidance_scale: float = 4.0
    scheduler: str = "ddim"
    threads: int = 1


def other_colour(colour: str) -> str:
    """The colour at the far side of the palette (red <-> blue, orange <-> purple, ...): a clearly different one."""
    return COLOUR_NAMES[(COLOUR_NAMES.index(colour) + 4) % len(COLOUR_NAMES)]


def subject_picture(shape: str, colour: str, texture: str, size: int, fraction: float = 0.4,
                    scale: int = 4) -> Image.Image:
    """A picture of one object on white, made as scenes make their subject crops; ``fraction``: the object's size
    as a share of the canvas (varies the texture's period relative to the object)."""
    canvas = np.full((size * scale, size * scale, 3), 255.0, dtype=np.float32)
    half = fraction * size / 2
    mask = paint_object(canvas, shape, colour, texture, (size / 2 - half, size / 2 - half, size / 2 + half,
                                                         size / 2 + half), size, scale)
    return subject_crop(Image.fromarray(np.round(canvas).astype(np.uint8)), mask, mask_box(mask), size, resample="box")


def one_subject_scenes(n: int, seed: int, size: int) -> list:
    """The first ``n`` held-out scenes of stream ``seed`` with one object (a reserved instance)."""
    out = []
    for scene in iter_scenes(seed, size, "heldout"):
        if len(scene.objects) == 1:
            out.append(scene)
            if len(out) == n:
                return out


def direction_changes(values: np.ndarray, tolerance: float = 0.02) -> int:
    """How often a sequence turns (steps smaller than ``tolerance`` carry no direction)."""
    steps = np.diff(values)
    signs = [np.sign(s) for s in steps if abs(s) >= tolerance]
    return int(sum(a != b for a, b in zip(signs, signs[1:])))


# ------------------------------------------------------------------------------------------------ measurements
def measure_lines(pipe, oracle, cfg: InterpolationEvalConfig, size: int, path: str,
                  spacing: str = "uniform") -> tuple[dict, np.ndarray, list]:
    """Lines from colour A to colour B, frames placed by ``spacing`` (``interpolate``'s); returns (metrics, uint8
    frames (L, F, S, S, 3), per-line records)."""
    from ..interpolation import Corner

    records, all_frames = [], []
    for scene in one_subject_scenes(cfg.num_lines, cfg.seed, size):
        obj = scene.objects[0]
        b = other_colour(obj.colour)
        prompt = scene.captions["appearance_free"]
        corners = [Corner(prompt, {obj.noun: Image.fromarray(obj.crop)}),
                   Corner(prompt, {obj.noun: subject_picture(obj.shape, b, obj.texture, size)})]
        out = pipe.interpolate(corners, steps=cfg.frames, path=path, seed=cfg.seed,
                               num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                               scheduler=cfg.scheduler, output_type="np", spacing=spacing)
        frames = np.round(np.clip(out.images, 0, 1) * 255).astype(np.uint8)
        records.append({"prompt": prompt, **score_line(pipe, oracle, frames, obj, b),
                        "positions": [round(c, 4) for _, c in out.positions],
                        "embed_norms": out.image_embeds.float().norm(dim=-1).numpy().round(3).tolist()})
        all_frames.append(frames)
        print(f"line {len(records)}/{cfg.num_lines} {path} {spacing}: {obj.shape} {obj.colour}->{b} found "
              f"{records[-1]['present']} reading {records[-1]['reading_b']}", flush=True)
    label = path if spacing == "uniform" else f"{path}, {spacing} spacing"
    return summarize_lines(records, label), np.stack(all_frames), records


def score_line(pipe, oracle, frames: np.ndarray, obj, b: str) -> dict:
    """One line of uint8 frames (F, S, S, 3) from ``obj``'s colour to colour ``b``: the oracle's presence and colour
    reading p(B) / (p(A) + p(B)) per frame, and the CLIP-I steps (1 - cosine) between neighbouring frames."""
    probs = oracle.probs(frames)
    k = oracle_shapes().index(obj.shape)
    present = probs["presence"][:, k].numpy()
    colour = probs["colour"][:, k]
    pa, pb = colour[:, COLOUR_NAMES.index(obj.colour)].numpy(), colour[:, COLOUR_NAMES.index(b)].numpy()
    reading = pb / np.maximum(pa + pb, 1e-8)
    feats = F.normalize(clip_features(pipe, [Image.fromarray(f) for f in frames])[0], dim=-1)
    steps = (1 - (feats[:-1] * feats[1:]).sum(-1)).numpy()
    return {
        "shape": obj.shape, "texture": obj.texture, "colour_a": obj.colour, "colour_b": b,
        "present": present.round(3).tolist(), "reading_b": reading.round(3).tolist(),
        "colour_read": [COLOUR_NAMES[int(i)] for i in colour.argmax(-1)], "clip_i_steps": steps.round(4).tolist(),
        "found_every_frame": bool((present >= 0.5).all()), "direction_changes": direction_changes(reading),
        "a_to_b": bool(reading[0] < 0.5 < reading[-1]), "even": bool(steps.max() <= 2 * steps.mean()),
        "max_over_mean_step": float(steps.max() / max(steps.mean(), 1e-8)),
    }


def summarize_lines(records: list[dict], path: str) -> dict:
    """The share of lines meeting each criterion, and the found rate by frame."""
    n = len(records)
    found = np.array([r["present"] for r in records]) >= 0.5
    return {
        "lines": n, "frames": found.shape[1], "path": path,
        "found_every_frame": sum(r["found_every_frame"] for r in records) / n,
        "found_by_frame": found.mean(0).round(3).tolist(),
        "ends_read_a_then_b": sum(r["a_to_b"] for r in records) / n,
        "at_most_one_direction_change": sum(r["direction_changes"] <= 1 for r in records) / n,
        "monotone_a_to_b": sum(r["direction_changes"] == 0 and r["a_to_b"] for r in records) / n,
        "even_steps": sum(r["even"] for r in records) / n,
        "max_over_mean_step_median": float(np.median([r["max_over_mean_step"] for r in records])),
        "all_three": sum(r["found_every_frame"] and r["direction_changes"] <= 1 and r["even"] for r in records) / n,
    }


def ramp_renders(scene, b: str, frames: int, size: int) -> np.ndarray:
    """A one-subject held-out ``scene`` rendered ``frames`` times with its subject's colour mixed in RGB from its own
    colour to palette colour ``b``: uint8 (frames, S, S, 3)."""
    a_rgb, b_rgb = np.array(COLOURS[scene.objects[0].colour], float), np.array(COLOURS[b], float)
    return np.stack([render_scene(scene.seed, size, "heldout",
                                  recolour={0: tuple(float(round(v)) for v in (1 - t) * a_rgb + t * b_rgb)}).image
                     for t in np.linspace(0, 1, frames)])


def measure_ramp(pipe, oracle, cfg: InterpolationEvalConfig, size: int) -> dict:
    """References for the lines: each line's scene rendered with the subject's colour mixed from A to B in RGB (a
    truly smooth transition), scored as rendered and as decoded from the renders' own CLIP embeddings. They tell
    what the judge (oracle, tiny CLIP) and the decoder make of a smooth colour ramp."""
    rendered, decoded = [], []
    ecfg = EvalConfig(images_per_prompt=cfg.frames, num_inference_steps=cfg.num_inference_steps,
                      guidance_scale=cfg.guidance_scale, scheduler=cfg.scheduler, seed=cfg.seed)
    for scene in one_subject_scenes(cfg.num_lines, cfg.seed, size):
        obj = scene.objects[0]
        b = other_colour(obj.colour)
        renders = ramp_renders(scene, b, cfg.frames, size)
        rendered.append(score_line(pipe, oracle, renders, obj, b))
        embeds = clip_features(pipe, [Image.fromarray(r) for r in renders])[0]
        decoded.append(score_line(pipe, oracle, decode(pipe, embeds, ecfg, size), obj, b))
    return {"rendered": summarize_lines(rendered, "RGB ramp, rendered"),
            "decoded": summarize_lines(decoded, "RGB ramp, decoded from its CLIP embeddings")}


def oracle_shapes() -> list[str]:
    from .vocab import SHAPES

    return list(SHAPES)


def colour_accuracy(oracle, images: np.ndarray, objects: list) -> float:
    """Share of images whose subject (objects[i // ipp]) the oracle finds and reads in its colour."""
    readings = oracle.read(images)
    ipp = len(images) // len(objects)
    right = [r.shapes[objects[k // ipp].shape].present >= 0.5 and
             r.shapes[objects[k // ipp].shape].colour == objects[k // ipp].colour for k, r in enumerate(readings)]
    return float(np.mean(right))


def measure_knobs(pipe, oracle, cfg: InterpolationEvalConfig, size: int) -> dict:
    """The subject-scale curve and one picture vs several, on one-subject held-out scenes."""
    scenes = one_subject_scenes(cfg.num_prompts, cfg.seed + 1, size)
    objects = [s.objects[0] for s in scenes]
    prompts = [s.captions["appearance_free"] for s in scenes]
    ecfg = EvalConfig(images_per_prompt=cfg.images_per_prompt, num_inference_steps=cfg.num_inference_steps,
                      guidance_scale=cfg.guidance_scale, scheduler=cfg.scheduler, seed=cfg.seed)
    ipp = cfg.images_per_prompt

    def embeds(subjects_of, **controls) -> torch.Tensor:
        out = []
        for i, (prompt, obj) in enumerate(zip(prompts, objects)):
            gens = _generators([cfg.seed * 7919 + i * ipp + j for j in range(ipp)])
            out.append(pipe.prior_embeddings(prompt, {obj.noun: subjects_of(i, obj)}, None, ipp, gens,
                                             **controls).image_embeds)
        return torch.cat(out).float()

    one = [[Image.fromarray(o.crop)] for o in objects]
    curve = {}
    for scale in cfg.scales:
        e = embeds(lambda i, o: one[i], subject_scale=scale)
        curve[str(scale)] = colour_accuracy(oracle, decode(pipe, e, ecfg, size), objects)
        print(f"subject scale {scale}: colour right {curve[str(scale)]:.3f}", flush=True)
    fractions = np.linspace(0.26, 0.40, cfg.pictures)
    several = [[subject_picture(o.shape, o.colour, o.texture, size, float(f)) for f in fractions] for o in objects]
    first_only = colour_accuracy(oracle, decode(pipe, embeds(lambda i, o: several[i][:1]), ecfg, size), objects)
    all_of_them = colour_accuracy(oracle, decode(pipe, embeds(lambda i, o: several[i]), ecfg, size), objects)
    return {"prompts": len(scenes), "images": len(scenes) * ipp, "subject_scale_colour_accuracy": curve,
            "monotone": bool(all(a <= b for a, b in zip(list(curve.values()), list(curve.values())[1:]))),
            "one_picture_colour_accuracy": first_only, f"{cfg.pictures}_pictures_colour_accuracy": all_of_them,
            "scene_crop_colour_accuracy": curve[str(1.0)] if 1.0 in cfg.scales else None}


def measure_grid(pipe, model: str, cfg: InterpolationEvalConfig, size: int, out: Path) -> dict:
    """The paper's Figure 7 in miniature, written with the interpolate command's writer, and its corners compared
    bitwise with `generate`'s PNGs for the same seed and settings."""
    from ..cli import GenerateArgs, generate
    from ..interpolation import Corner
    from ..interpolation_io import write_interpolation

    scene = next(s for s in iter_scenes(cfg.seed + 2, size, "heldout") if len(s.objects) == 2)
    prompt = scene.captions["appearance_free"]
    pictures = out / "subjects"
    pictures.mkdir(parents=True, exist_ok=True)
    alternatives = []
    for obj in scene.objects:
        paths = []
        for colour in (obj.colour, other_colour(obj.colour)):
            path = pictures / f"{obj.shape.replace(' ', '-')}-{colour}-{obj.texture}.png"
            if not path.is_file():
                subject_picture(obj.shape, colour, obj.texture, size).save(path)
            paths.append(str(path))
        alternatives.append(paths)
    (a0, b0), (a1, b1) = alternatives
    words = [o.noun for o in scene.objects]
    combos = [(a0, a1), (a0, b1), (b0, a1), (b0, b1)]
    corners = [Corner(prompt, {words[0]: x, words[1]: y}, label=f"{Path(x).stem} + {Path(y).stem}") for x, y in combos]
    settings = dict(num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                    scheduler=cfg.scheduler)
    result = pipe.interpolate(corners, steps=cfg.grid_steps, path="slerp", seed=cfg.seed, **settings)
    written = write_interpolation(result, corners, out / "grid", settings, cfg.seed, "slerp", cfg.grid_steps)
    same = []
    for (x, y), index in zip(combos, (0, cfg.grid_steps - 1, cfg.grid_steps * (cfg.grid_steps - 1),
                                      cfg.grid_steps**2 - 1)):
        args = GenerateArgs(prompt=prompt, subjects={words[0]: x, words[1]: y}, seed=cfg.seed,
                            steps=cfg.num_inference_steps, guidance=cfg.guidance_scale, scheduler=cfg.scheduler,
                            model=model, out=str(out / "generate"), progress=False)
        png = generate(args)[0]
        same.append(bool(np.array_equal(np.asarray(Image.open(png)), np.asarray(result.images[index]))))
    return {"prompt": prompt, "corners": [c.describe() for c in corners], "grid": str(written["grid"]),
            "corners_bitwise_equal_to_generate": same}


def lines_figure(frames: dict[str, np.ndarray], records: list, rows: int = 8, scale: int = 2) -> Image.Image:
    """Rows of lines (A left, B right), one row per entry of ``frames`` (slerp, lerp, ...) for each line, with the
    line's label; frames enlarged ``scale`` times (nearest neighbour)."""
    from PIL import ImageDraw

    paths = list(frames)
    frames = {p: f.repeat(scale, axis=2).repeat(scale, axis=3) for p, f in frames.items()}
    s, n = frames[paths[0]].shape[2], frames[paths[0]].shape[1]
    margin = 150
    sheet = Image.new("RGB", (margin + n * s, rows * len(paths) * s), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(min(rows, len(records))):
        for j, path in enumerate(paths):
            y = (i * len(paths) + j) * s
            sheet.paste(Image.fromarray(np.concatenate(list(frames[path][i]), axis=1)), (margin, y))
            r = records[i]
            draw.text((2, y + 2), f"{r['shape']} {r['colour_a']}->{r['colour_b']}", fill="black")
            draw.text((2, y + 14), path, fill="gray")
    return sheet


def run_interpolation_eval(model: str | os.PathLike, oracle_path: str | os.PathLike, out_dir: str | os.PathLike,
                           cfg: InterpolationEvalConfig | None = None) -> dict:
    """All four measurements; writes ``metrics.json``, ``metrics.md``, ``lines.png`` and ``grid/`` into ``out_dir``.
    Each finished part is kept in ``parts/`` so that a rerun resumes."""
    from ..atomic import atomic_path
    from ..pipeline import LambdaEclipsePipeline
    from .oracle import load_oracle

    cfg = cfg or InterpolationEvalConfig()
    out = Path(out_dir)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    try:
        pipe = LambdaEclipsePipeline.from_pretrained(str(model))
        pipe.set_progress_bar_config(disable=True)
        oracle = load_oracle(oracle_path)
        size = int(pipe.unet.config.sample_size) * pipe.movq_scale_factor
        def shown(path) -> str:  # relative to the working folder when inside it, so reports do not name a machine
            rel = os.path.relpath(path)
            return str(path) if rel.startswith("..") else rel

        metrics: dict = {"config": asdict(cfg), "model": shown(model), "oracle": shown(oracle_path), "size": size}

        def part(name: str, compute):
            file = out / "parts" / f"{name}.json"
            if file.is_file():
                return json.loads(file.read_text())
            clock = time.monotonic()
            value = compute()
            value["seconds"] = round(time.monotonic() - clock, 1)
            atomic_write(file, json.dumps(value, indent=2, ensure_ascii=False))
            return value

        frames, records = {}, {}

        def lines(path: str, spacing: str = "uniform"):
            name = f"lines-{path}" if spacing == "uniform" else f"lines-{path}-{spacing}"

            def compute():
                m, f, r = measure_lines(pipe, oracle, cfg, size, path, spacing)
                np.save(out / "parts" / f"{name}.npy", f)
                return {"metrics": m, "records": r}
            value = part(name, compute)
            frames[value["metrics"]["path"]] = np.load(out / "parts" / f"{name}.npy")
            records[value["metrics"]["path"]] = value["records"]
            return value["metrics"]

        # cheapest-first order of what matters most, so that a partial run already answers something
        metrics["lines"] = {"slerp": lines("slerp")}
        metrics["knobs"] = part("knobs", lambda: measure_knobs(pipe, oracle, cfg, size))
        metrics["grid"] = part("grid", lambda: measure_grid(pipe, str(model), cfg, size, out))
        metrics["lines"]["lerp"] = lines("lerp")
        metrics["ramp"] = part("ramp", lambda: measure_ramp(pipe, oracle, cfg, size))
        metrics["lines"]["slerp, perceptual spacing"] = lines("slerp", "perceptual")
    finally:
        torch.set_num_threads(previous)
    with atomic_path(out / "lines.png") as temporary:
        lines_figure(frames, records["slerp"]).save(temporary, format="PNG")
    with atomic_path(out / "grid.png") as temporary:  # the grid enlarged for reading, from its frame PNGs
        from ..interpolation_io import grid_image

        stem = Path(metrics["grid"]["grid"]).name.removesuffix("-grid.png")
        images = [Image.open(out / "grid" / f"{stem}-frame{k:03d}.png") for k in range(cfg.grid_steps**2)]
        grid_image(images, cfg.grid_steps, metrics["grid"]["corners"], scale=4).save(temporary, format="PNG")
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False))
    atomic_write(out / "metrics.md", metrics_markdown(metrics))
    return metrics


def metrics_markdown(m: dict) -> str:
    """The report's tables."""
    lines = ["# Interpolation and control knobs in the miniature world", "",
             f"Model `{m['model']}`, oracle `{m['oracle']}`; config `{json.dumps(m['config'])}`.", "",
             "| path | lines | subject found in every frame | colour A→B, at most one change of direction | "
             "monotone A→B | even CLIP-I steps (max ≤ 2× mean) | all three | found, by frame |",
             "|---|---|---|---|---|---|---|---|"]
    rows = list(m["lines"].items()) + [(x["path"], x) for x in m.get("ramp", {}).values() if isinstance(x, dict)]
    for path, x in rows:
        lines.append(f"| {path} | {x['lines']} | {x['found_every_frame']:.2f} | {x['at_most_one_direction_change']:.2f} | "
                     f"{x['monotone_a_to_b']:.2f} | {x['even_steps']:.2f} | {x['all_three']:.2f} | "
                     f"{' '.join(f'{v:.2f}' for v in x['found_by_frame'])} |")
    k = m["knobs"]
    curve = k["subject_scale_colour_accuracy"]
    lines += ["", f"Subject scale ({k['images']} images, one-subject held-out prompts): subject colour right",
              "", "| " + " | ".join(curve) + " |", "|" + "---|" * len(curve),
              "| " + " | ".join(f"{v:.3f}" for v in curve.values()) + " |", "",
              f"Pictures per subject: one {k['one_picture_colour_accuracy']:.3f}, several "
              f"{[v for key, v in k.items() if key.endswith('_pictures_colour_accuracy') and not key.startswith('one')][0]:.3f}.",
              "", f"Grid corners bitwise equal to `generate`: {m['grid']['corners_bitwise_equal_to_generate']}.", ""]
    return "\n".join(lines)
