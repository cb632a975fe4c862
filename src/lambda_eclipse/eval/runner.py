"""The runner: generate a suite's images into a run folder, resumably and in disjoint shards.

A run folder holds ``run.json`` (suite, generation settings, model) and ``images/<job key>/<name>.png``, one name
per (job, image index) by the package's naming rule (:func:`lambda_eclipse.outputs.image_stem`). Images are
written as each batch finishes, and a rerun skips every image that exists, so a killed run loses at most the batch
in flight. Batches (up to ``batch_prompts`` prompts with the same subjects through one pipeline call) are planned
from the whole job list before sharding, and rank ``r`` of ``w`` takes every ``w``-th batch: the shards are
disjoint, their union is the unsharded run, and each image is made in the same batch either way. A Canny job
runs on the rank that made its edge source, after it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..errors import UserError
from .suites import Job, Suite

def subject_preparation(cfg: "GenerationConfig") -> str:
    """How the reference pictures were prepared, recorded with every result."""
    if cfg.segment:
        return "segmented onto white (Grounding DINO + SAM, the dataset builder's stages), as the paper does"
    return "as given: the paper segments subjects onto white first (evaluate --segment does)"


@dataclass(frozen=True)
class GenerationConfig:
    """How a suite's images are made; the defaults are the paper's (DDIM 50 steps, guidance 7.5, 4 per prompt)."""

    steps: int = 50  # decoder denoising steps
    guidance: float = 7.5  # decoder classifier-free guidance
    scheduler: str = "ddim"  # decoder scheduler: ddim (the paper) or ddpm
    images_per_prompt: int = 4
    seed: int = 0  # image j of every prompt uses seed + j (prior and decoder noise), as `generate` does
    height: int | None = None  # default: the decoder's native size
    width: int | None = None
    batch_prompts: int = 8  # prompts per pipeline call (same subjects); not part of the images' identity
    segment: bool = False  # cut each subject out of its condition picture onto white first (the paper's way)


def run_identity(suite: Suite, cfg: GenerationConfig, model: str) -> dict:
    """What makes a run's images: a folder holds one identity (checked on every rerun and every shard)."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "batch_prompts"}
    return {"suite": suite.name, "generation": settings, "model": model}


def open_run(out: str | Path, identity: dict) -> Path:
    """Create or reopen a run folder; refuse one made by another suite, other settings or another model."""
    out = Path(out)
    manifest = out / "run.json"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a folder")
    if manifest.is_file():
        previous = json.loads(manifest.read_text())
        for key in ("suite", "generation", "model"):
            if previous.get(key) != identity[key]:
                raise UserError(f"{str(out)!r} holds a run with another {key} ({previous.get(key)!r}); give another "
                                "--out, or delete that folder to start fresh")
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"{str(out)!r} is not empty and holds no evaluation run (run.json); give an empty or new --out")
    else:
        atomic_write(manifest, json.dumps(identity, indent=2))
    return out


def image_path(out: Path, job: Job, index: int, cfg: GenerationConfig) -> Path:
    """Where image ``index`` of ``job`` lives: deterministic, so resume and shards find it."""
    from ..outputs import image_stem

    return out / "images" / job.key / f"{image_stem(job.prompt, {'job': job.key}, cfg.seed + index)}.png"


def plan_batches(jobs: list[Job], batch_prompts: int) -> list[list[Job]]:
    """Consecutive jobs with the same subjects and image count share a batch (up to ``batch_prompts``); a job
    with an edge map is a batch of its own (the pipeline takes one edge map per call)."""
    batches: list[list[Job]] = []
    for job in jobs:
        last = batches[-1] if batches else None
        if (last and job.edge_from is None and last[0].edge_from is None and last[0].subjects == job.subjects
                and last[0].images == job.images and len(last) < batch_prompts):
            last.append(job)
        else:
            batches.append([job])
    return batches


def shard(batches: list[list[Job]], rank: int, world: int) -> list[list[Job]]:
    """Rank ``rank``'s batches: every ``world``-th batch without edge maps, then the edge-map batches whose
    source job this rank makes (so the source exists when they run)."""
    if not 0 <= rank < world:
        raise UserError(f"shard {rank}/{world}: the rank must be in 0..{world - 1}")
    owner = {}
    plain = [b for b in batches if b[0].edge_from is None]
    for i, batch in enumerate(plain):
        for job in batch:
            owner[job.key] = i % world
    mine = [b for i, b in enumerate(plain) if i % world == rank]
    return mine + [b for b in batches if b[0].edge_from is not None and owner.get(b[0].edge_from, 0) == rank]


class SubjectCache:
    """Each subject's conditioning embedding, encoded once per run from its condition picture."""

    def __init__(self, pipe, suite: Suite, segment_into: Path | None = None, detector=None, segmenter=None,
                 threshold: float = 0.2) -> None:
        """``segment_into``: cut each picture's subject out onto white first (box and text ``threshold``, the
        builder's 0.2) and save the cut-out there."""
        self.pipe, self.suite, self.cache = pipe, suite, {}
        self.segment_into, self.detector, self.segmenter, self.threshold = segment_into, detector, segmenter, threshold

    def __call__(self, ids: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
        from ..encoders import load_image

        for sid in ids:
            if sid not in self.cache:
                subject = self.suite.subjects[sid]
                image = load_image(subject.condition_image, what=f"subject {sid!r} image")
                if self.segment_into is not None:
                    image = self._segmented(subject.word, image)
                self.cache[sid] = self.pipe.encode_subject(image, subject.word)
        return {self.suite.subjects[s].word: self.cache[s] for s in ids} or None


    def _segmented(self, word: str, image):
        from ..dataset.ground import Detector
        from ..dataset.segment import Segmenter
        from ..dataset.subject import segment_subjects

        if self.detector is None:  # loaded once per run, on the pipeline's device
            device = str(getattr(self.pipe, "device", "cpu"))
            try:
                self.detector, self.segmenter = Detector.from_pretrained(device=device), Segmenter.from_pretrained(device=device)
            except OSError as error:
                raise UserError(f"--segment cannot load its detector/segmenter ({str(error).splitlines()[0]}); "
                                "drop --segment to use the pictures as given") from None
        return segment_subjects({word: image}, str(self.segment_into), self.detector, self.segmenter,
                                box_threshold=self.threshold, text_threshold=self.threshold)[word]


def generate_batch(pipe, suite: Suite, batch: list[Job], cfg: GenerationConfig, subjects: SubjectCache, out: Path):
    """Generate one batch and return its PIL images in job-major order (job 0's images, then job 1's...)."""
    from ..encoders import load_image

    n = batch[0].images
    edge = None
    if batch[0].edge_from is not None:
        source = next(j for j in suite.jobs if j.key == batch[0].edge_from)
        edge = load_image(image_path(out, source, 0, cfg), what="edge source image")
    generators = [torch.Generator().manual_seed(cfg.seed + k) for _ in batch for k in range(n)]
    return pipe([j.prompt for j in batch], subjects=subjects(batch[0].subjects), edge_image=edge,
                num_images_per_prompt=n, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                height=cfg.height, width=cfg.width, scheduler=cfg.scheduler, generator=generators).images


def generate_suite(pipe, suite: Suite, out: str | Path, cfg: GenerationConfig, model: str = "", rank: int = 0,
                   world: int = 1, jobs: list[Job] | None = None, progress: bool = True) -> dict:
    """Make every missing image of ``jobs`` (default: the suite's) that shard ``rank``/``world`` owns.

    Returns ``{"made", "skipped", "seconds"}``: images written now, images found, generation wall time.
    """
    from tqdm.auto import tqdm

    from ..outputs import save_png

    out = open_run(out, run_identity(suite, cfg, model))
    mine = shard(plan_batches(jobs if jobs is not None else suite.jobs, cfg.batch_prompts), rank, world)
    subjects = SubjectCache(pipe, suite, out / "segmented" if cfg.segment else None)
    made = skipped = 0
    clock = time.monotonic()
    for batch in tqdm(mine, desc=f"{suite.name} [{rank + 1}/{world}]", unit="batch", disable=not progress):
        paths = [image_path(out, job, k, cfg) for job in batch for k in range(job.images)]
        if all(p.is_file() for p in paths):
            skipped += len(paths)
            continue
        images = generate_batch(pipe, suite, batch, cfg, subjects, out)
        jobs_of = [job for job in batch for _ in range(job.images)]
        for k, (path, image, job) in enumerate(zip(paths, images, jobs_of)):
            if path.is_file():  # made before a kill: keep it (it is the same image)
                skipped += 1
                continue
            metadata = {"prompt": job.prompt, "subjects": list(job.subjects), "job": job.key, "suite": suite.name,
                        "seed": str(cfg.seed + k % job.images), "settings": asdict(cfg)}
            save_png(image, path.parent, path.stem, metadata)
            made += 1
    return {"made": made, "skipped": skipped, "seconds": round(time.monotonic() - clock, 3)}
