"""One evaluation from one call: build the suite, check everything, generate (resumable, sharded), score, report.

:func:`evaluate` takes an already loaded pipeline, so whoever calls it decides how the model is assembled (a Hub
id, a local folder, a fine-tuned UNet or LoRA swapped in); the CLI does that in ``load_eval_pipeline``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from .metrics import DEFAULT_CLIP, DEFAULT_DINO, Judges
from .runner import GenerationConfig, subject_preparation, generate_suite, open_run, run_identity
from .suites import Suite, build_suite


@dataclass(frozen=True)
class EvalSpec:
    """What to evaluate (everything but the model and the judges, which are given loaded)."""

    suite: str  # dreambench, multibench, dreambench-canny
    out: str  # run folder: run.json, images/, metrics.json, metrics.md, per_subject.csv, plot.png, grids/
    dataset_dir: str | None = None  # a copy of DreamBench's dataset/ folder
    subjects: tuple[str, ...] | None = None  # a subset of the suite's subjects (default all)
    limit: int | None = None  # only the first N prompts (a quick pass); a later run without it completes the run
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    judge_dino: str = DEFAULT_DINO  # Hub id or folder of the DINO judge
    judge_clip: str = DEFAULT_CLIP  # Hub id or folder of the CLIP judge (CLIP-I, CLIP-T)
    rank: int = 0  # this process's shard (accelerate launch sets it)
    world: int = 1
    score: bool = True  # score and report after generating (the main process, once every shard is done)
    progress: bool = True


def limited_jobs(suite: Suite, limit: int | None) -> list:
    """The first ``limit`` prompts of the suite (with a Canny suite, each prompt's three jobs), or all of them."""
    if limit is None:
        return list(suite.jobs)
    if limit < 1:
        raise UserError(f"--limit must be a positive number of prompts, got {limit}")
    unit = 3 if suite.name == "dreambench-canny" else 1
    return list(suite.jobs[: limit * unit])


def check_jobs(pipe, suite: Suite, jobs: list, cfg: GenerationConfig) -> None:
    """Every input check before anything is written: the model's (steps, sizes, prior kind), every prompt's
    subject words, every subject picture."""
    from ..encoders import load_image
    from ..inputs import check_inputs

    if pipe.unet is None or pipe.movq is None or pipe.scheduler is None:
        raise UserError("this model has no decoder (unet/scheduler/movq); the evaluation renders images")
    pipe.check_inputs("a", None, None, cfg.images_per_prompt, cfg.steps, cfg.guidance, cfg.height, cfg.width,
                      cfg.scheduler, names={"num_inference_steps": "--steps", "guidance_scale": "--guidance",
                                            "num_images_per_prompt": "--images-per-prompt"})
    for job in jobs:
        words = {suite.subjects[s].word: str(suite.subjects[s].condition_image) for s in job.subjects}
        check_inputs(job.prompt, words or None)
        if job.subjects and not pipe.prior.has_control:
            raise UserError("this model's prior is text-only; the evaluation needs a λ-ECLIPSE prior")
    for sid in sorted({s for j in jobs for s in j.subjects}):
        for picture in suite.subjects[sid].images:
            load_image(picture, what=f"subject {sid!r} picture")


def evaluate(pipe, spec: EvalSpec, judges: Judges | None, model: str = "", suite: Suite | None = None) -> dict:
    """Generate what is missing of this shard; then (``spec.score``) score the whole run and write the reports.

    Returns ``{"run", "generation": {"made", "skipped", "seconds"}, "result": metrics or None}``.
    """
    import torch

    suite = suite or build_suite(spec.suite, spec.dataset_dir, list(spec.subjects) if spec.subjects else None,
                                 spec.generation.images_per_prompt)
    jobs = limited_jobs(suite, spec.limit)
    check_jobs(pipe, suite, jobs, spec.generation)
    if spec.score and judges is None:
        raise UserError("scoring needs judges; load them (load_judges) or pass score=False")
    if spec.score:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UserError("the reports' plots need matplotlib; pip install 'lambda-eclipse[eval]'")
    out = open_run(spec.out, run_identity(suite, spec.generation, model))
    pipe.set_progress_bar_config(disable=True)
    made = generate_suite(pipe, suite, out, spec.generation, model, spec.rank, spec.world, jobs, spec.progress)
    made["device"] = str(pipe._execution_device)
    if not spec.score:
        return {"run": out, "generation": made, "result": None}
    from .reports import write_reports
    from .scoring import aggregate, score_run

    clock = time.monotonic()
    rows = score_run(out, suite, spec.generation, judges, jobs, spec.progress)
    scored = [{"key": j.key, "subjects": list(j.subjects), "kind": j.kind} for j in jobs if j.scored]
    result = {"suite": suite.name, "model": model, "generation": asdict(spec.generation), "judges": judges.describe(),
              "subject_preparation": subject_preparation(spec.generation), "prompts": len(scored),
              "images": len(rows), "limit": spec.limit, **aggregate(rows), "notes": suite.notes,
              "timing": {**made, "scoring_seconds": round(time.monotonic() - clock, 3),
                         "torch_threads": torch.get_num_threads()},
              "jobs_scored": scored}
    from .reports import dino_drop

    if suite.name == "dreambench-canny":
        result["dino_drop"] = dino_drop(result["overall"])
    write_reports(Path(out), result, suite, spec.generation)
    _write_rows(Path(out), rows)
    return {"run": out, "generation": made, "result": result}


def _write_rows(out: Path, rows: list[dict]) -> None:
    """Every image's scores (per_image.csv), for analyses beyond the tables."""
    import csv
    import io

    from ..atomic import atomic_write

    keys = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "per_image.csv", buffer.getvalue())
