"""Build the miniature model family: scenes → tiny CLIP → tiny MoVQ → tiny K2.2 UNet.

Writes ``out_dir/components/{text_encoder,tokenizer,image_encoder,image_processor,movq,unet,scheduler}``
(each folder appears atomically) and keeps resumable state under ``out_dir/work/``. Rerunning skips
stages whose folders are complete and resumes a killed stage from its last checkpoint. Run by
`lambda-eclipse miniworld build` (:mod:`.bundle`), or as :func:`build_components` from Python.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..atomic import atomic_write
from .clip_recipe import CLIP_COMPONENTS, ClipRecipe, run_clip_stage
from .data import load_or_render_pool
from .movq_recipe import MoVQRecipe, run_movq_stage
from .unet_recipe import ColourRecipe, UNetRecipe, run_colour_stage, run_unet_stage

COMPONENTS = CLIP_COMPONENTS + ("movq", "unet", "scheduler")


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the built components (same config + seed → same training runs)."""

    size: int = 32  # image side in px; the MoVQ maps it to size/2 latents
    seed: int = 0
    threads: int = 1  # torch CPU threads
    scenes: int = 50000  # training pool (rendered once, cached under work/)
    heldout_scenes: int = 512  # held-out pool for the metrics
    # share of training-pool objects painted off the palette (blended toward another palette colour): the CLIP,
    # MoVQ and UNet then see colours between the palette's, as interpolation needs
    colour_mix: float = 0.0
    verify_n: int = 64  # held-out scenes rendered through KandinskyV22Pipeline at the end
    clip: ClipRecipe = field(default_factory=ClipRecipe)
    movq: MoVQRecipe = field(default_factory=MoVQRecipe)
    unet: UNetRecipe = field(default_factory=UNetRecipe)
    # off in the shipped build: measured, it did not make interpolation even (docs/miniworld-notes.md)
    colour: ColourRecipe = field(default_factory=lambda: ColourRecipe(steps=0))

    @classmethod
    def from_dict(cls, data: dict) -> BuildConfig:
        """From a nested dict (e.g. parsed YAML); unknown keys raise ``TypeError``."""
        data = dict(data)
        recipes = {"clip": ClipRecipe, "movq": MoVQRecipe, "unet": UNetRecipe, "colour": ColourRecipe}
        for key, kind in recipes.items():
            if key in data:
                sub = dict(data[key] or {})
                for f in fields(kind):
                    if f.name in sub and isinstance(sub[f.name], list):
                        sub[f.name] = tuple(sub[f.name])
                data[key] = kind(**sub)
        return cls(**data)


def smoke_config(size: int = 32) -> BuildConfig:
    """A seconds-long build with tiny models: for tests, not for use."""
    return BuildConfig(
        size=size, scenes=200, heldout_scenes=32, verify_n=4,
        clip=ClipRecipe(steps=3, batch_scenes=16, batch_crops=8, hidden=32, layers=1, heads=2,
                        projection_dim=32, warmup=1),
        movq=MoVQRecipe(steps=3, batch=8, block_out_channels=(32, 32), warmup=1),
        unet=UNetRecipe(steps=3, batch=8, block_out_channels=(32, 32), cross_attention_dim=32, warmup=1),
        colour=ColourRecipe(steps=2, batch=8, scenes=32, pairs=8, warmup=1),
    )


def components_complete(components: Path, names: tuple[str, ...]) -> bool:
    """Whether every named component folder exists (folders only ever appear complete)."""
    return all((Path(components) / n).is_dir() for n in names)


STAGES = ("clip", "movq", "unet", "colour")
STAGE_OUTPUTS = {"clip": CLIP_COMPONENTS, "movq": ("movq",), "unet": ("unet", "scheduler"), "colour": ()}
"""The component folders each stage writes; ``colour`` continues ``unet/`` in place and is recorded in the report."""


def stages_complete(out_dir: str | Path, stages: tuple[str, ...]) -> bool:
    """Whether every stage in ``stages`` of the build in ``out_dir`` is finished (its folders exist; for ``colour``,
    its report entry says so)."""
    out_dir = Path(out_dir)
    report_path = out_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return all(components_complete(out_dir / "components", STAGE_OUTPUTS[s])
               and (bool(STAGE_OUTPUTS[s]) or bool(report.get(s, {}).get("complete"))) for s in stages)


def build_components(
    out_dir: str | Path, config: BuildConfig | None = None, verify_steps: int = 50, stages: tuple[str, ...] = STAGES
) -> Path:
    """Run ``stages`` (in this order, skipping finished ones); returns ``out_dir/components``."""
    config = config or BuildConfig()
    out_dir = Path(out_dir)
    (out_dir / "work").mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, config.threads))  # 1 keeps a background build from crowding the machine
    try:
        return _run_stages(out_dir, config, verify_steps, stages)
    finally:
        torch.set_num_threads(previous_threads)  # a library call should not leave the process single-threaded


def _run_stages(out_dir: Path, config: BuildConfig, verify_steps: int, stages: tuple[str, ...]) -> Path:
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    components, work = out_dir / "components", out_dir / "work"
    atomic_write(out_dir / "config.json", json.dumps(asdict(config), indent=2))
    report_path = out_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def record(stage: str, metrics: dict, started: float) -> None:
        report[stage] = {**metrics, "seconds": round(time.time() - started, 1)}
        atomic_write(report_path, json.dumps(report, indent=2))
        log(f"{stage} done: {report[stage]}")

    t = time.time()
    pool = load_or_render_pool(work / "pool-train.npz", config.scenes, config.seed, config.size, "train",
                               colour_mix=config.colour_mix)
    heldout = load_or_render_pool(
        work / "pool-heldout.npz", config.heldout_scenes, config.seed, config.size, "heldout"
    )
    log(f"scene pools ready ({len(pool)} train, {len(heldout)} held-out) in {time.time() - t:.0f} s")

    runners = {  # stage -> how to run it
        "clip": (lambda: run_clip_stage(
            pool, heldout, work / "clip", components, config.clip, config.seed, config.size)),
        "movq": (lambda: run_movq_stage(
            pool, heldout, work / "movq", components, config.movq, config.seed)),
        "unet": (lambda: run_unet_stage(
            pool, heldout, work / "unet", components, config.unet, config.seed, config.size,
            verify_n=config.verify_n, verify_steps=verify_steps)),
        "colour": (lambda: run_colour_stage(
            components, work / "unet-colour", config.colour, config.unet, config.seed, config.size)),
    }
    for stage in (s for s in STAGES if s in stages):
        run = runners[stage]
        if stages_complete(out_dir, (stage,)):
            log(f"{stage}: complete, skipped")
            continue
        t = time.time()
        record(stage, run(), t)
    log(f"{', '.join(stages)} ready in {components}")
    return components
