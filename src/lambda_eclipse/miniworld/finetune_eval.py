"""`lambda-eclipse miniworld finetune-eval`: the paper's decoder fine-tuning (Figure 9) in the miniature world.

Eight held-out subject instances (shape × colour × texture triples the bundle never saw, one per shape) are the
*fine-tuned* concepts; eight others (one per shape too) are the *control* concepts, never fine-tuned. The bundle's
decoder is fine-tuned on all eight at once with ``finetune-decoder`` (the real command's objective and data path:
the concepts are written as a concepts folder of scene images), in full and in LoRA mode, and scored at several
step counts on held-out prompts:

* each prompt is a held-out scene (held-out templates, 1-3 objects) holding one of the concepts; its caption is the
  appearance-free one and every subject word is bound to its subject crop, exactly as ``miniworld eval``'s
  ``with_subjects`` condition (the prior is unchanged, so its embeddings are computed once);
* concept figures (oracle) are about the concept's own object in the scene: shape found, and shape found with the
  colour right; CLIP-I and DINO-like similarity of the image to the concept's crop;
* composition figures are over the whole image: background colour and kind, CLIP-T to the appearance-free caption;
* forgetting: the same figures on the control concepts' prompts;
* the decoder alone: the fine-tuned concepts' prompts decoded from the CLIP image embedding of the held-out scene
  itself instead of the prior's (set ``scene_embedding``), which tells what decoder fine-tuning can fix (the
  decoder's rendering of the concept) from what it cannot (the prior's embedding);
* shape found and colour right is also reported by the number of objects in the prompt's scene (``..._1obj`` ...),
  since a multi-object scene's errors are mostly binding errors of the decoder (docs/miniworld-notes.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..atomic import atomic_path, atomic_write
from ..errors import UserError
from .scenes import RESERVED_INSTANCES, Scene, iter_scenes, render_scene

Instance = tuple[str, str, str]  # (shape, colour, texture)


@dataclass(frozen=True)
class FinetuneEvalConfig:
    """The measurement: which concepts, how much data, which runs, when to score."""

    train_images: int = 96  # scenes per fine-tuned concept (scenes are free to render; 12 overfit sooner)
    prompts_per_concept: int = 6  # held-out prompts per concept: 2 each with 1, 2 and 3 objects
    images_per_prompt: int = 2  # two decoder seeds per prompt: half the noise of one for the same prompts
    eval_steps: tuple[int, ...] = (0, 100, 400)  # both modes at each (~35 min on one shared CPU thread)
    batch_size: int = 16
    full_lr: float = 1e-4  # the bundle trained at 4e-4 (cosine to 4e-5); the paper's 1e-5 is for the 1.2B K2.2 UNet
    lora_lr: float = 1e-3
    lora_rank: int = 8
    cond_dropout: float = 0.1
    snr_gamma: float = 0.0  # finetune-decoder's loss.snr_gamma (the bundle itself trained with 5)
    train_stream: int = 7002  # scene streams disjoint from the build's (<= 9000 are not the oracle's)
    eval_stream: int = 7001
    selection_stream: int = 7003  # where concepts="hardest" measures the bundle's zero-shot rate per instance
    selection_prompts: int = 12  # prompts per instance there (2 images each)
    concepts: str = "first"  # "first": each shape's first reserved instance (control: its second); "hardest": the 8
    # reserved instances the bundle draws worst zero-shot (control: the next 8), as a user fine-tunes what fails
    num_inference_steps: int = 25
    guidance_scale: float = 4.0
    threads: int = 1


def split_instances() -> tuple[list[Instance], list[Instance]]:
    """(fine-tuned, control): of each shape's three reserved instances, the first (sorted) is fine-tuned and the
    second is control."""
    by_shape: dict[str, list[Instance]] = {}
    for inst in sorted(RESERVED_INSTANCES):
        by_shape.setdefault(inst[0], []).append(inst)
    return [v[0] for v in by_shape.values()], [v[1] for v in by_shape.values()]


@torch.no_grad()
def prompt_embeddings(pipe, prompts: list[tuple[Scene, int]], images_per_prompt: int) -> torch.Tensor:
    """The prior's embeddings of ``prompts`` (appearance-free caption, every subject word bound to its object's
    crop), ``images_per_prompt`` each: (len(prompts) · images_per_prompt, D)."""
    from .evaluate import EvalConfig, clip_features, subject_embeddings

    crops = [clip_features(pipe, [Image.fromarray(o.crop) for o in s.objects])[0] for s, _ in prompts]
    return subject_embeddings(pipe, [s for s, _ in prompts], crops, EvalConfig(images_per_prompt=images_per_prompt))


@torch.no_grad()
def zero_shot_scores(pipe, oracle, instances: list[Instance], cfg: FinetuneEvalConfig, size: int) -> dict[str, float]:
    """The bundle's shape-found-and-colour-right rate per instance ("shape-colour-texture" -> rate) on held-out
    prompts of the *selection* stream (``cfg.selection_stream``, disjoint from the scored prompts, so that picking
    the instances it draws worst does not also pick prompts that happen to go badly)."""
    out = {}
    for inst in instances:
        others = [i for i in instances if i != inst]
        prompts = eval_prompts([inst], others, cfg.selection_prompts, cfg.selection_stream, size)
        embeds = prompt_embeddings(pipe, prompts, cfg.images_per_prompt)
        out["-".join(inst)] = score(pipe, oracle, prompts, embeds, cfg, size)[0]["shape_found_and_colour_right"]
    return out


def hardest_instances(scores: dict[str, float], count: int) -> tuple[list[Instance], list[Instance]]:
    """(fine-tuned, control) from per-instance zero-shot ``scores``: the ``count`` the bundle draws worst, and the
    ``count`` next worst (ties by name), so both sets are equally hard for the bundle before fine-tuning."""
    ranked = sorted(scores, key=lambda name: (scores[name], name))
    as_instance = {"-".join(i): i for i in RESERVED_INSTANCES}
    return [as_instance[n] for n in ranked[:count]], [as_instance[n] for n in ranked[count : 2 * count]]


def _key(obj) -> Instance:
    return (obj.shape, obj.colour, obj.texture)


def eval_prompts(concepts: list[Instance], exclude: list[Instance], per_concept: int, stream: int, size: int,
                 limit: int = 40000) -> list[tuple[Scene, int]]:
    """(scene, index of the concept's object) pairs: ``per_concept`` per concept, balanced over 1-3 objects, from
    held-out scenes holding the concept once and none of ``exclude``."""
    want = {(c, n): per_concept // 3 + (1 if n - 1 < per_concept % 3 else 0) for c in concepts for n in (1, 2, 3)}
    picked: list[tuple[Scene, int]] = []
    for k, scene in enumerate(iter_scenes(stream, size, "heldout")):
        keys = [_key(o) for o in scene.objects]
        if k >= limit or not any(want.values()):
            break
        if any(e in keys for e in exclude) or len({o.shape for o in scene.objects}) < len(keys):
            continue  # the oracle reads one object per shape
        for c in concepts:
            slot = (c, len(keys))
            if keys.count(c) == 1 and want[slot] > 0:
                want[slot] -= 1
                picked.append((scene, keys.index(c)))
                break
    return picked


def write_concepts_folder(concepts: list[Instance], per_concept: int, stream: int, size: int, root: Path,
                          colour: tuple[float, float, float] | None = None) -> Path:
    """One folder of scene PNGs per concept (scenes that hold it), the layout ``finetune-decoder`` reads.
    ``colour``: paint the concepts' objects in this RGB instead of their own (a colour the bundle never drew)."""
    counts = {c: 0 for c in concepts}
    if root.is_dir() and all(len(list((root / "-".join(c)).glob("*.png"))) == per_concept for c in concepts):
        return root
    for scene in iter_scenes(stream, size, "heldout"):
        keys = [_key(o) for o in scene.objects]
        image = scene.image if colour is None else render_scene(
            scene.seed, size, "heldout", recolour={i: colour for i, k in enumerate(keys) if k in concepts}).image
        for c in set(keys) & set(concepts):
            if counts[c] < per_concept:
                folder = root / "-".join(c)
                folder.mkdir(parents=True, exist_ok=True)
                with atomic_path(folder / f"{counts[c]:03d}.png") as temporary:
                    Image.fromarray(image).save(temporary, format="PNG")
                counts[c] += 1
        if all(v == per_concept for v in counts.values()):
            return root
    raise RuntimeError("stream ran out of scenes")  # unreachable: every instance recurs


@torch.no_grad()
def score(pipe, oracle, prompts: list[tuple[Scene, int]], embeds: torch.Tensor, cfg, size: int) -> dict[str, float]:
    """Decode ``embeds`` (len(prompts) × ipp, D) with the pipeline's current UNet and score them."""
    from ..encoders import encode_text
    from .evaluate import EvalConfig, clip_features, decode

    ecfg = EvalConfig(images_per_prompt=cfg.images_per_prompt, num_inference_steps=cfg.num_inference_steps,
                      guidance_scale=cfg.guidance_scale)
    images = decode(pipe, embeds, ecfg, size)
    readings = oracle.read(images)
    proj, pool = (F.normalize(x, dim=-1) for x in clip_features(pipe, [Image.fromarray(i) for i in images]))
    crops = [clip_features(pipe, [Image.fromarray(s.objects[i].crop)]) for s, i in prompts]
    text = F.normalize(encode_text(pipe.tokenizer, pipe.text_encoder,
                                   [s.captions["appearance_free"] for s, _ in prompts]).pooled.float(), dim=-1)
    rows: dict[str, list[float]] = {}
    for k, reading in enumerate(readings):
        scene, i = prompts[k // cfg.images_per_prompt]
        obj, (c_proj, c_pool) = scene.objects[i], crops[k // cfg.images_per_prompt]
        r = reading.shapes[obj.shape]
        found = r.present >= 0.5
        rows.setdefault(f"shape_found_and_colour_right_{len(scene.objects)}obj", []).append(float(found and r.colour == obj.colour))
        for name, value in (("shape_found", found), ("shape_found_and_colour_right", found and r.colour == obj.colour),
                            ("clip_i", float(proj[k] @ F.normalize(c_proj[0], dim=-1))),
                            ("dino", float(pool[k] @ F.normalize(c_pool[0], dim=-1))),
                            ("background_colour", reading.background_colour == scene.background_colour),
                            ("background_kind", reading.background_kind == scene.background_kind),
                            ("clip_t", float(proj[k] @ text[k // cfg.images_per_prompt]))):
            rows.setdefault(name, []).append(float(value))
    out = {k: float(np.mean(v)) for k, v in rows.items()}
    out["n"] = len(images)
    return out, images


def run_finetune_eval(model_dir: str | os.PathLike, oracle_dir: str | os.PathLike, out_dir: str | os.PathLike,
                      work_dir: str | os.PathLike, cfg: FinetuneEvalConfig | None = None) -> dict:
    """Fine-tune (full and LoRA, resumable in ``work_dir``) and score at ``cfg.eval_steps``; writes
    ``out_dir/metrics.json``, ``finetune-eval.png`` (figures vs steps) and ``grid.png``. Returns the metrics."""
    from ..pipeline import LambdaEclipsePipeline
    from ..train.core import run_training
    from ..train.finetune import load_finetune_config, loop_settings, prepare_finetune
    from .evaluate import clip_features
    from .oracle import load_oracle

    cfg = cfg or FinetuneEvalConfig()
    if cfg.concepts not in ("first", "hardest"):
        raise UserError(f"unknown concepts choice {cfg.concepts!r}; choose first or hardest")
    torch.set_num_threads(cfg.threads)
    out, work = Path(out_dir), Path(work_dir)
    pipe = LambdaEclipsePipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    oracle = load_oracle(oracle_dir)
    size = int(pipe.unet.config.sample_size) * pipe.movq_scale_factor
    selection = None
    if cfg.concepts == "hardest":
        selected = work / "selection.json"  # computed once: the run resumes with the same concepts
        if selected.is_file():
            selection = json.loads(selected.read_text())
        else:
            selection = zero_shot_scores(pipe, oracle, sorted(RESERVED_INSTANCES), cfg, size)
            work.mkdir(parents=True, exist_ok=True)
            atomic_write(selected, json.dumps(selection, indent=2))
        tuned, control = hardest_instances(selection, 8)
    else:
        tuned, control = split_instances()
    sets = {"finetuned": eval_prompts(tuned, control, cfg.prompts_per_concept, cfg.eval_stream, size),
            "control": eval_prompts(control, tuned, cfg.prompts_per_concept, cfg.eval_stream, size)}
    embeds = {name: prompt_embeddings(pipe, p, cfg.images_per_prompt) for name, p in sets.items()}
    # the decoder alone: the held-out scene's own CLIP image embedding, what Eq. 2 trains the decoder to invert
    sets["scene_embedding"] = sets["finetuned"]
    embeds["scene_embedding"] = clip_features(pipe, [Image.fromarray(s.image) for s, _ in sets["finetuned"]])[0].float(
        ).repeat_interleave(cfg.images_per_prompt, 0)
    concepts_dir = write_concepts_folder(tuned, cfg.train_images, cfg.train_stream, size, work / "concepts")
    original = pipe.unet
    results: dict[str, dict] = {"full": {}, "lora": {}}
    grids: dict[str, dict[str, np.ndarray]] = {}
    runs = {}
    for mode, lr in (("full", cfg.full_lr), ("lora", cfg.lora_lr)):
        config = load_finetune_config(None, [
            f"data.concepts_dir={concepts_dir}", f"model.decoder={model_dir}", f"model.encoders={model_dir}",
            f"mode={mode}", f"optim.lr={lr}", f"lora.rank={cfg.lora_rank}", f"data.batch_size={cfg.batch_size}",
            f"loss.cond_dropout={cfg.cond_dropout}", f"loss.snr_gamma={cfg.snr_gamma}", "mixed_precision=no", "log_with=none", "progress=false",
        ], output_dir=str(work / mode), max_steps=max(cfg.eval_steps), checkpoint_every=min(s for s in cfg.eval_steps if s))
        runs[mode] = (config, prepare_finetune(config))
    metrics = {"config": asdict(cfg), "finetuned_concepts": ["-".join(c) for c in tuned],
               "control_concepts": ["-".join(c) for c in control],
               "prompts": {k: len(v) for k, v in sets.items()}, "results": results}
    if selection is not None:
        metrics["zero_shot_selection"] = selection
    # step by step, both modes at each step, and the report rewritten after each point: a run cut short still
    # leaves a complete report of what it measured
    for step in cfg.eval_steps:
        for mode, (config, objective) in runs.items():
            points, run_dir = results[mode], Path(config.output_dir)
            cached = run_dir / "scores" / f"step-{step:06d}.json"
            pictures = cached.with_suffix(".npz")
            if step == 0 and mode != "full":
                points["0"], grids[f"{mode}@0"] = results["full"]["0"], grids["full@0"]  # the same bundle
                continue
            if cached.is_file() and pictures.is_file():
                points[str(step)] = json.loads(cached.read_text())
                grids[f"{mode}@{step}"] = dict(np.load(pictures))
                continue
            if step == 0:
                pipe.unet = original
            else:
                done = max([0] + [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")])
                run = run_training(objective, loop_settings(config), stop_after=step - min(done, step))
                pipe.unet = run.model.eval()
            points[str(step)] = {}
            for name, prompts in sets.items():
                figures, images = score(pipe, oracle, prompts, embeds[name], cfg, size)
                points[str(step)][name] = figures
                grids.setdefault(f"{mode}@{step}", {})[name] = images
            pipe.unet = original
            with atomic_path(pictures) as temporary:
                with open(temporary, "wb") as handle:
                    np.savez_compressed(handle, **grids[f"{mode}@{step}"])
            atomic_write(cached, json.dumps(points[str(step)], indent=2))
            print(f"finetune-eval {mode} step {step}: " + json.dumps(
                {n: round(v["shape_found_and_colour_right"], 3) for n, v in points[str(step)].items()}), flush=True)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "metrics.json", json.dumps(metrics, indent=2))
            plot_figures(metrics, out / "finetune-eval.png")
            atomic_write(out / "metrics.md", write_markdown(metrics))
            write_grid(sets["finetuned"], grids, cfg, out / "grid.png")
    return metrics


FIGURES = (("shape_found_and_colour_right", "shape found and colour right"),
           *((f"shape_found_and_colour_right_{n}obj", f"... in scenes of {n} object{'s' * (n > 1)}") for n in (1, 2, 3)),
           ("shape_found", "shape found"),
           ("clip_i", "CLIP-I to the subject crop"), ("dino", "DINO-like to the subject crop"),
           ("background_colour", "background colour right"), ("background_kind", "background kind right"),
           ("clip_t", "CLIP-T (appearance-free prompt)"))


def write_markdown(metrics: dict) -> str:
    """The report as Markdown tables: one per concept set, a column per (mode, step)."""
    columns = [(mode, step) for mode, points in metrics["results"].items() for step in sorted(points, key=int)
               if not (mode == "lora" and step == "0")]
    lines = ["# Decoder fine-tuning in the miniature world", "",
             f"Fine-tuned concepts: {', '.join(metrics['finetuned_concepts'])}.",
             f"Control concepts (not fine-tuned): {', '.join(metrics['control_concepts'])}.",
             f"Prompts: {metrics['prompts']} (images per prompt: {metrics['config']['images_per_prompt']}); "
             "step 0 is the bundle without fine-tuning.", ""]
    if "zero_shot_selection" in metrics:
        c = metrics["config"]
        ranked = sorted(metrics["zero_shot_selection"].items(), key=lambda kv: (kv[1], kv[0]))
        lines += [f"Concepts chosen as the reserved instances the bundle draws worst zero-shot: shape found and colour "
                  f"right on {c['selection_prompts']} prompts each ({c['images_per_prompt']} images) of stream "
                  f"{c['selection_stream']}, not the scored prompts; fine-tuned = the 8 lowest, control = the next 8. "
                  "Rates: " + ", ".join(f"{k} {v:.2f}" for k, v in ranked) + ".", ""]
    sections = {"finetuned": "fine-tuned concepts", "control": "control concepts (not fine-tuned: forgetting)",
                "scene_embedding": "fine-tuned concepts, decoded from the held-out scene's own CLIP embedding "
                                   "(the decoder alone, no prior)"}
    n = metrics["prompts"]["finetuned"] * metrics["config"]["images_per_prompt"]
    lines += [f"Noise: one standard error of a rate near 0.5 over {n} images is {50 / n ** 0.5:.1f} points "
              "(an upper bound: two images of one prompt are not independent draws).", ""]
    for which, title in sections.items():
        if which not in metrics["prompts"]:
            continue
        lines += [f"## {title}", "",
                  "| metric | " + " | ".join("bundle" if s == "0" else f"{m} @{s}" for m, s in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for key, title in FIGURES:
            cells = [f"{metrics['results'][m][s][which].get(key, float('nan')):.3f}" for m, s in columns]
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_figures(metrics: dict, path: Path) -> None:
    """Shape-found-and-colour-right, background and CLIP-T vs fine-tuning steps; full vs LoRA, tuned vs control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("shape_found_and_colour_right", "shape found and colour right"), ("background_colour", "background colour"),
              ("clip_i", "CLIP-I to the subject"), ("clip_t", "CLIP-T"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for mode, style in (("full", "-"), ("lora", "--")):
            points = metrics["results"].get(mode, {})
            steps = sorted(points, key=int)
            for which, colour in (("finetuned", "tab:blue"), ("control", "tab:orange"), ("scene_embedding", "tab:green")):
                if which == "scene_embedding" and key != "shape_found_and_colour_right":
                    continue  # the decoder-alone line belongs with the concept figure only
                ax.plot([int(s) for s in steps], [points[s][which][key] for s in steps], style, color=colour,
                        marker="o", label=f"{mode}, {which.replace('_', ' ')}")
        ax.set_title(title)
        ax.set_xlabel("fine-tuning steps")
    axes[0].legend(fontsize=7, handlelength=3.5)  # long enough to show full (solid) vs LoRA (dashed)
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", dpi=110)
    plt.close(fig)


def write_grid(prompts: list[tuple[Scene, int]], grids: dict, cfg: FinetuneEvalConfig, path: Path) -> None:
    """One row per fine-tuned concept (its first prompt): the scene's render, the bundle's image, then each
    run's at each step (full@100, lora@100, full@200, ...)."""
    columns = [k for k in grids if "finetuned" in grids[k] and k != "lora@0"]  # lora@0 is the bundle again
    rows, seen = [], set()
    for p, (scene, i) in enumerate(prompts):
        concept = _key(scene.objects[i])
        if concept in seen:
            continue
        seen.add(concept)
        cells = [scene.image] + [grids[c]["finetuned"][p * cfg.images_per_prompt] for c in columns]
        rows.append(np.concatenate(cells, 1))
    grid = np.concatenate(rows, 0)
    with atomic_path(path) as temporary:
        Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(temporary, format="PNG")
