"""Miniature-world evaluation: generate from held-out subjects and prompts, score with the concept oracle.

Prompts are held-out scenes (every one holds at least one reserved shape × colour × texture instance, and they use
the held-out templates), balanced over 1, 2 and 3 subjects. The prompt is the scene's *appearance-free* caption
("a photo of a ball left of a box over a teal grid background"), so a subject's colour and texture can only come
from its subject image. Each prompt is rendered under these conditions, with identical decoder noise per image:

* ``render``: the ground-truth render itself (no generation): the judge's own ceiling on these scenes;
* ``gt_embedding``: the render's CLIP image embedding decoded directly: the decoder's ceiling (decoder fidelity);
* ``text_only``: the prompt through the same prior without subjects: the concept baseline (colour is chance);
* ``with_subjects``: the prompt with every subject word bound to its subject crop (λ-ECLIPSE);
* ``image_only``: the mean of the subject crops' embeddings decoded directly: the composition baseline.

Why the mean embedding and not the subject words bound into a prompt of subject words only ("a ball a box"): such
a prompt is unlike any training caption (the miniworld vocabulary has no "and", and every caption names a
background), so a low score would mix "no composition was asked for" with "the prior saw an unknown prompt". The
mean embedding bypasses the prior and carries exactly the subject images and nothing else, so the gap to
``with_subjects`` is what the text adds. It is rescaled to the subjects' mean norm to stay in the decoder's range.

An optional λ sweep (``priors``) reruns ``with_subjects`` with other priors swapped in (the paper's Table 6).

Scoring goes through the evaluation harness: the concept oracle is a metric plug-in
(:class:`~lambda_eclipse.miniworld.oracle_metric.OracleMetric`), the cosines and their tally are
:mod:`lambda_eclipse.eval`'s; this module only makes the scenes, the conditions and the images.
`lambda-eclipse evaluate miniworld` (or `miniworld eval`) runs it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..atomic import atomic_write
from ..encoders import encode_text, zero_image_embedding
from ..errors import UserError
from ..eval.metrics import similarity_scores, vision_tower_features
from ..eval.scoring import Tally
from .oracle import Oracle, SceneReading, load_oracle, score_readings
from .oracle_metric import OracleMetric
from .scenes import Scene, iter_scenes

CONDITIONS = ("render", "gt_embedding", "text_only", "with_subjects", "image_only")
BUCKETS = ("all", "1", "2", "3")


@dataclass(frozen=True)
class EvalConfig:
    """What one evaluation run generates (same config + model -> same images)."""

    num_prompts: int = 48  # held-out scenes, balanced over 1, 2 and 3 subjects
    seed: int = 0  # the held-out scene stream and every generator (the oracle trains on streams >= 9000)
    images_per_prompt: int = 2
    num_inference_steps: int = 25
    guidance_scale: float = 4.0  # what the miniworld decoder was verified with (the paper's 7.5 oversaturates it)
    scheduler: str = "ddim"
    batch: int = 32  # images per decoder call
    threads: int = 1
    grid_rows: int = 8
    size: int | None = None  # image side; default: the decoder's native size


# ------------------------------------------------------------------------------------------------ inputs
def eval_scenes(num_prompts: int, seed: int, size: int) -> list[Scene]:
    """The first held-out scenes of stream ``seed`` with 1, 2 and 3 objects, ``num_prompts // 3`` of each
    (the remainder to the fewer-subject buckets), in stream order."""
    want = {n: num_prompts // 3 + (1 if n - 1 < num_prompts % 3 else 0) for n in (1, 2, 3)}
    out: list[Scene] = []
    for scene in iter_scenes(seed, size, "heldout"):
        if len(out) == num_prompts:
            break
        if want[len(scene.objects)] > 0:
            want[len(scene.objects)] -= 1
            out.append(scene)
    return out


def _pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(i) for i in images]


def clip_features(pipe, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) images -> (projected CLIP embeddings (N, D), "DINO-like" pooled states (N, H)) from the pipeline's own
    CLIP vision tower (no DINO model offline): the harness's judge for such a model."""
    return vision_tower_features(pipe.image_processor, pipe.image_encoder, images)


def _seeds(cfg: EvalConfig, n_prompts: int, stream: int) -> list[int]:
    """One seed per image (prompt i, copy j), the same in every condition so only the conditioning differs."""
    return [(cfg.seed * 4 + stream) * 1_000_003 + k for k in range(n_prompts * cfg.images_per_prompt)]


def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def load_prior(path: str | os.PathLike):
    """A prior from a prior folder, a training run folder (``prior/``) or a pipeline folder (``prior/``)."""
    from ..prior import LambdaEclipsePrior

    path = Path(path)
    if (path / "prior" / "config.json").is_file():
        path = path / "prior"
    if not (path / "config.json").is_file():
        raise UserError(f"{str(path)!r} holds no prior (config.json); give a prior, run or pipeline folder")
    return LambdaEclipsePrior.from_pretrained(str(path)).eval()


# ------------------------------------------------------------------------------------------------ generation
@torch.no_grad()
def subject_embeddings(pipe, scenes: list[Scene], crop_feats: list[torch.Tensor], cfg: EvalConfig) -> torch.Tensor:
    """The prior's embeddings with every subject word bound to its crop: (N·images_per_prompt, D)."""
    out, seeds, ipp = [], _seeds(cfg, len(scenes), 1), cfg.images_per_prompt
    for i, (scene, feats) in enumerate(zip(scenes, crop_feats)):
        subjects = {o.noun: feats[k] for k, o in enumerate(scene.objects)}
        gens = _generators(seeds[i * ipp : (i + 1) * ipp])
        out.append(pipe.prior_embeddings(scene.captions["appearance_free"], subjects, None, ipp, gens).image_embeds)
    return torch.cat(out).float()


@torch.no_grad()
def decode(pipe, embeds: torch.Tensor, cfg: EvalConfig, size: int) -> np.ndarray:
    """(N, D) image embeddings -> uint8 (N, S, S, 3) through the package's one decoding function, image k seeded
    with decoder seed k."""
    from ..decoding import SCHEDULERS, decode_image_embeds, decoder_scheduler

    if cfg.scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler {cfg.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    scheduler = decoder_scheduler(pipe.scheduler, cfg.scheduler)
    negative = zero_image_embedding(pipe.image_encoder)
    seeds = _seeds(cfg, len(embeds) // cfg.images_per_prompt, 0)
    out = []
    for i in range(0, len(embeds), cfg.batch):
        chunk = embeds[i : i + cfg.batch]
        images = decode_image_embeds(
            pipe.unet, scheduler, pipe.movq, chunk, negative.expand(len(chunk), -1), size, size,
            cfg.num_inference_steps, cfg.guidance_scale, _generators(seeds[i : i + len(chunk)]), "np",
        )
        out.append(np.round(np.clip(images, 0, 1) * 255).astype(np.uint8))
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------------ scoring
def score_condition(
    readings: list[SceneReading], feats: tuple[torch.Tensor, torch.Tensor], scenes: list[Scene], ipp: int,
    render_feats: tuple[torch.Tensor, torch.Tensor], crop_feats: list[tuple[torch.Tensor, torch.Tensor]],
    text_free: torch.Tensor, text_full: torch.Tensor,
) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics of N·ipp images (image k shows scene k // ipp) by number of subjects: the oracle plug-in's concept
    and composition rows, and the harness's cosines to each image's subject crops, render and captions.
    ``feats``/``render_feats``/``crop_feats`` are (projected, pooled) pairs; text features are projected (N, D)."""
    shown = [scenes[k // ipp] for k in range(len(readings))]
    tally = Tally()
    buckets = [str(len(s.objects)) for s in shown]
    tally.add_rows(OracleMetric.rows(readings, shown), buckets)
    index = [k // ipp for k in range(len(readings))]
    features = {"clip_i_subject": feats[0], "dino_subject": feats[1], "clip_i_render": feats[0],
                "dino_render": feats[1], "clip_t": feats[0], "clip_t_full_caption": feats[0]}
    references = {
        "clip_i_subject": [crop_feats[s][0] for s in index], "dino_subject": [crop_feats[s][1] for s in index],
        "clip_i_render": [render_feats[0][s : s + 1] for s in index],
        "dino_render": [render_feats[1][s : s + 1] for s in index],
        "clip_t": [text_free[s : s + 1] for s in index], "clip_t_full_caption": [text_full[s : s + 1] for s in index],
    }
    tally.add_rows(similarity_scores(features, references), buckets)
    return tally.summary()


# ------------------------------------------------------------------------------------------------ the run
def _load_pipeline(model):
    if not isinstance(model, (str, os.PathLike)):
        return model
    from ..pipeline import LambdaEclipsePipeline

    pipe = LambdaEclipsePipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_miniworld_eval(
    model_dir, oracle_path, out_dir: str | os.PathLike, num_prompts: int = 48, seed: int = 0,
    priors: dict[str, str | os.PathLike] | None = None, config: EvalConfig | None = None,
) -> dict:
    """Generate and score; write ``out_dir/metrics.json``, ``metrics.md`` and ``grid.png``; return the metrics.

    Args:
        model_dir: a pipeline folder (``LambdaEclipsePipeline.from_pretrained``) or a loaded pipeline.
        oracle_path: an oracle folder (:func:`~lambda_eclipse.miniworld.oracle.train_oracle`) or a loaded Oracle.
        num_prompts, seed: override ``config``'s.
        priors: optional ``{"λ=0": prior_dir, ...}``: the with-subject metrics again for each prior (λ sweep).
    """
    from .evaluate_report import write_grid, write_markdown

    cfg = EvalConfig(**{**asdict(config or EvalConfig()), "num_prompts": num_prompts, "seed": seed})
    if cfg.num_prompts < 1 or cfg.images_per_prompt < 1:
        raise UserError("num_prompts and images_per_prompt must be at least 1")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    try:
        pipe = _load_pipeline(model_dir)
        oracle = oracle_path if isinstance(oracle_path, Oracle) else load_oracle(oracle_path)
        if not pipe.prior.has_control:
            raise UserError("this model's prior is text-only; the evaluation needs a λ-ECLIPSE prior")
        if pipe.unet is None or pipe.movq is None or pipe.scheduler is None:
            raise UserError("this model has no decoder (unet/scheduler/movq); the evaluation renders images")
        metrics, images, scenes = _evaluate(pipe, oracle, cfg, priors or {})
    finally:
        torch.set_num_threads(previous_threads)
    metrics["model"] = str(model_dir) if isinstance(model_dir, (str, os.PathLike)) else type(model_dir).__name__
    metrics["oracle"] = str(oracle_path) if isinstance(oracle_path, (str, os.PathLike)) else "in-memory"
    metrics["oracle_movq_matches"] = _oracle_movq_matches(model_dir, oracle)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False))
    atomic_write(out / "metrics.md", write_markdown(metrics))
    write_grid(out / "grid.png", scenes, images, cfg.images_per_prompt, cfg.grid_rows)
    return metrics


def _oracle_movq_matches(model_dir, oracle: Oracle) -> bool | None:
    """Whether the oracle was trained on reconstructions of this model's MoVQ (None: cannot tell). A False means
    the MoVQ was retrained since: retrain the oracle, or the judge sees images unlike its training data."""
    from .oracle_train import weights_fingerprint

    trained_on = oracle.config.get("train", {}).get("movq_sha256")
    if not isinstance(model_dir, (str, os.PathLike)) or not trained_on or not (Path(model_dir) / "movq").is_dir():
        return None
    return weights_fingerprint(Path(model_dir) / "movq") == trained_on


def _evaluate(pipe, oracle: Oracle, cfg: EvalConfig, priors: dict) -> tuple[dict, dict[str, np.ndarray], list[Scene]]:
    """All conditions: (metrics, condition -> uint8 images (N·ipp, S, S, 3), scenes)."""
    timing: dict[str, float] = {}
    clock = time.monotonic()
    size = cfg.size or int(pipe.unet.config.sample_size) * pipe.movq_scale_factor
    scenes, ipp = eval_scenes(cfg.num_prompts, cfg.seed, size), cfg.images_per_prompt
    renders = np.stack([s.image for s in scenes])
    render_feats = clip_features(pipe, _pil(renders))
    crop_feats = [clip_features(pipe, [Image.fromarray(o.crop) for o in s.objects]) for s in scenes]
    text_free = encode_text(pipe.tokenizer, pipe.text_encoder, [s.captions["appearance_free"] for s in scenes]).pooled
    text_full = encode_text(pipe.tokenizer, pipe.text_encoder, [s.captions["full"] for s in scenes]).pooled

    def rep(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(ipp, dim=0)

    embeds: dict[str, torch.Tensor] = {"gt_embedding": rep(render_feats[0])}
    prompts = [s.captions["appearance_free"] for s in scenes]
    embeds["text_only"] = pipe.prior_embeddings(prompts, None, None, ipp, _generators(_seeds(cfg, len(scenes), 1))).image_embeds.float()
    embeds["with_subjects"] = subject_embeddings(pipe, scenes, [c[0] for c in crop_feats], cfg)
    means = []
    for proj, _ in crop_feats:  # the image-only baseline, rescaled to the subjects' mean norm
        m = proj.mean(0)
        means.append(m * proj.norm(dim=-1).mean() / m.norm().clamp_min(1e-8))
    embeds["image_only"] = rep(torch.stack(means))
    timing["prior_and_encoders_s"] = time.monotonic() - clock

    images: dict[str, np.ndarray] = {"render": np.repeat(renders, ipp, axis=0)}
    clock = time.monotonic()
    for name, e in embeds.items():
        images[name] = decode(pipe, e, cfg, size)
    timing["decode_s"] = time.monotonic() - clock
    n_decoded = sum(len(e) for e in embeds.values())

    def judge(imgs: np.ndarray) -> tuple[dict, list[SceneReading]]:
        readings = oracle.read(imgs)
        return score_condition(readings, clip_features(pipe, _pil(imgs)), scenes, ipp, render_feats, crop_feats,
                               text_free, text_full), readings

    clock = time.monotonic()
    results: dict[str, dict] = {}
    fidelity: dict[str, dict] = {}
    per_image = [s for s in scenes for _ in range(ipp)]
    for name in CONDITIONS:
        results[name], readings = judge(images[name])
        if name in ("render", "gt_embedding"):
            fidelity[name] = score_readings(readings, per_image)
    timing["judge_s"] = time.monotonic() - clock

    sweep: dict[str, dict] = {}
    if priors:
        original = pipe.prior
        try:
            for label, path in priors.items():
                clock = time.monotonic()
                prior = load_prior(path).to(original.device)
                pipe.prior = prior if prior.dtype == original.dtype else prior.to(dtype=original.dtype)
                e = subject_embeddings(pipe, scenes, [c[0] for c in crop_feats], cfg)
                generated = decode(pipe, e, cfg, size)
                n_decoded += len(e)
                sweep[label] = {"prior": str(path), "metrics": judge(generated)[0]}
                images[f"with_subjects {label}"] = generated
                timing[f"sweep {label}_s"] = time.monotonic() - clock
        finally:
            pipe.prior = original
    total = sum(timing.values())
    timing.update(images_decoded=n_decoded, total_s=total, seconds_per_100_images=100 * total / max(1, n_decoded),
                  threads=torch.get_num_threads())
    counts = {b: sum(str(len(s.objects)) == b for s in scenes) for b in BUCKETS[1:]}
    metrics = {
        "config": {**asdict(cfg), "size": size}, "num_prompts": len(scenes), "images_per_condition": len(scenes) * ipp,
        "prompts_by_subjects": counts, "conditions": results, "decoder_fidelity": fidelity, "lambda_sweep": sweep,
        "timing": {k: round(v, 3) if isinstance(v, float) else v for k, v in timing.items()},
        "notes": {
            "dino": "DINO-like = cosine of the tiny CLIP vision encoder's unprojected pooled CLS state (no DINO offline)",
            "image_only": "mean of the subject crops' CLIP embeddings (rescaled to their mean norm) decoded directly",
            "strict": "concept metrics count a subject right only if the oracle finds its shape and reads its colour",
        },
    }
    return metrics, images, scenes

