"""Scoring a run folder: DINO, CLIP-I and CLIP-T per image, then per prompt, per subject and per kind.

Per DreamBooth convention (FACTS §4d): an image's DINO (CLIP-I) is its mean cosine over every real picture of the
subject; a multi-subject image's is the mean over its subjects. CLIP-T is the cosine to the prompt (which carries
the class nouns). A prompt's score is the mean over its images, a subject's the mean over its prompts, and a kind's
("live", "2 subjects", "with edges", "all") the mean over its prompts. Images are read back from the folder, so a
run generated in shards is scored once, after all of them (the merge).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .metrics import Judges, mean_pairwise_cosine
from .runner import GenerationConfig, image_path
from .suites import Job, Suite

METRICS = ("dino", "clip_i", "clip_t")


def _load(paths: list[Path]):
    from ..encoders import load_image

    return [load_image(p, what="generated image") for p in paths]


def score_images(images: list, job: Job, suite: Suite, judges: Judges, refs: dict) -> dict[str, list[float]]:
    """Per-image metrics of one job's images: ``{metric: [value per image]}``."""
    scores: dict[str, list[float]] = {}
    if judges.dino is not None and job.subjects:
        feats = judges.dino.embed(images)
        scores["dino"] = torch.stack([mean_pairwise_cosine(feats, refs[s]["dino"]) for s in job.subjects]).mean(0).tolist()
    if judges.clip is not None:
        feats = judges.clip.embed_images(images)
        if job.subjects:
            per = [mean_pairwise_cosine(feats, refs[s]["clip"]) for s in job.subjects]
            scores["clip_i"] = torch.stack(per).mean(0).tolist()
        scores["clip_t"] = (feats @ judges.clip.embed_texts([job.prompt]).T)[:, 0].tolist()
    for plugin in judges.plugins:  # per-image rows; a metric with several values per image counts by its mean
        rows = plugin.score(images, [job] * len(images))
        for metric in dict.fromkeys(m for r in rows for m in r):
            scores[metric] = [float(np.mean(r[metric])) if r.get(metric) else float("nan") for r in rows]
    return scores


class Tally:
    """metric -> bucket -> values, for reports broken down by bucket ("all" plus e.g. the number of subjects)."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, list[float]]] = {}

    def add(self, metric: str, bucket: str, value: float) -> None:
        for b in ("all", bucket):
            self.values.setdefault(metric, {}).setdefault(b, []).append(float(value))

    def add_rows(self, rows: list[dict[str, list[float]]], buckets: list[str]) -> None:
        """Plug-in rows (one dict per image, :class:`~lambda_eclipse.eval.metrics.MetricPlugin`) with each
        image's bucket."""
        for row, bucket in zip(rows, buckets):
            for metric, values in row.items():
                for value in values:
                    self.add(metric, bucket, value)

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """metric -> bucket -> {"mean", "n"}."""
        return {m: {b: {"mean": float(np.mean(v)), "n": len(v)} for b, v in sorted(per.items())}
                for m, per in self.values.items()}


def reference_features(suite: Suite, ids: set[str], judges: Judges) -> dict[str, dict[str, torch.Tensor]]:
    """Subject id -> {"dino": (R, H), "clip": (R, P)} normalised features of all its real pictures."""
    out = {}
    for sid in sorted(ids):
        pictures = _load(list(suite.subjects[sid].images))
        out[sid] = {"dino": judges.dino.embed(pictures) if judges.dino else None,
                    "clip": judges.clip.embed_images(pictures) if judges.clip else None}
    return out


def score_run(out: str | Path, suite: Suite, cfg: GenerationConfig, judges: Judges, jobs: list[Job] | None = None,
              progress: bool = True) -> list[dict]:
    """One row per scored image: ``{"job", "kind", "subjects", "index", "path", metric: value...}``.

    Raises UserError if an image is missing (a shard not yet run), naming how many.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    scored = [j for j in (jobs if jobs is not None else suite.jobs) if j.scored]
    missing = [image_path(out, j, k, cfg) for j in scored for k in range(j.images)]
    missing = [p for p in missing if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) of this run are missing (first: {missing[0]}); run the generation "
                        "(every shard) to the end, then score")
    refs = reference_features(suite, {s for j in scored for s in j.subjects}, judges)
    rows = []
    for job in tqdm(scored, desc="scoring", unit="prompt", disable=not progress):
        paths = [image_path(out, job, k, cfg) for k in range(job.images)]
        scores = score_images(_load(paths), job, suite, judges, refs)
        for k, path in enumerate(paths):
            rows.append({"job": job.key, "kind": job.kind, "subjects": "+".join(job.subjects), "index": k,
                         "prompt": job.prompt, "path": str(path.relative_to(out)),
                         **{m: float(v[k]) for m, v in scores.items()}})
    return rows


def aggregate(rows: list[dict]) -> dict:
    """Rows -> ``{"overall": {kind: {metric: {"mean", "n"}}}, "per_subject": {id: {metric: mean}}}``.

    Means are of per-prompt means (every prompt has the same number of images, so this equals the per-image mean);
    ``n`` counts prompts. "all" pools every kind.
    """
    per_job: dict[str, dict] = {}
    for row in rows:
        entry = per_job.setdefault(row["job"], {"kind": row["kind"], "subjects": row["subjects"], "values": defaultdict(list)})
        for key, value in row.items():
            if isinstance(value, float):
                entry["values"][key].append(value)
    overall: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    subjects: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for entry in per_job.values():
        for metric, values in entry["values"].items():
            m = float(np.mean(values))
            for kind in ("all", entry["kind"]):
                overall[kind][metric].append(m)
            for sid in entry["subjects"].split("+"):
                if sid:
                    subjects[sid][metric].append(m)
    return {
        "overall": {k: {m: {"mean": float(np.mean(v)), "n": len(v)} for m, v in per.items()} for k, per in overall.items()},
        "per_subject": {s: {m: float(np.mean(v)) for m, v in per.items()} for s, per in sorted(subjects.items())},
    }
