"""`lambda-eclipse miniworld build`: the whole miniature model family, step-bounded, seeded and resumable.

Stages (each skipped when its output is complete, each resumable after a kill):
  components  tiny CLIP, MoVQ and Kandinsky-2.2-style UNet          (:mod:`.build`)
  features    train and held-out feature stores through the feature store (:mod:`.prior_stage`)
  priors      the shipped prior (λ = 0.2, miniworld/prior.yaml), and for the λ sweep three shorter
              priors of one recipe (λ = 0, 0.2, 0.5; `sweep_overrides`), all with `train-prior`
  oracle      the concept judge for `miniworld eval`                 (:mod:`.oracle`)
  bundle      one diffusers-style folder that LambdaEclipsePipeline.from_pretrained loads
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .prior_stage import FeatureRecipe, train_miniworld_prior, write_scene_features
from ..atomic import atomic_dir

if TYPE_CHECKING:
    from .build import BuildConfig

SHIPPED_LAMBDA = 0.2
SWEEP_LAMBDAS = (0.0, 0.2, 0.5)


@dataclass(frozen=True)
class MiniworldBuild:
    """What `miniworld build` trains (defaults: the shipped bundle; `smoke()`: a CI-sized run)."""

    features: FeatureRecipe = field(default_factory=FeatureRecipe)
    prior_overrides: tuple[str, ...] = ()
    sweep: bool = True
    # The sweep's priors are shorter than the shipped one so that the whole build fits its 2-hour CPU budget.
    sweep_overrides: tuple[str, ...] = ("max_steps=1000", "checkpoint_every=250", "val_every=250")
    oracle_steps: int = 6000
    oracle_scenes: int = 30000
    threads: int = 2
    smoke_components: bool = False
    components: BuildConfig | None = None  # the component recipes; None: BuildConfig()'s defaults

    @classmethod
    def smoke(cls) -> "MiniworldBuild":
        return cls(
            features=FeatureRecipe(train_scenes=256, val_scenes=64, batch=64),
            prior_overrides=("max_steps=6", "checkpoint_every=3", "val_every=3", "data.batch_size=32",
                             "model.num_layers=1", "model.num_attention_heads=2", "progress=false"),
            sweep=False, oracle_steps=5, oracle_scenes=128, smoke_components=True,
        )


def load_encoders(components: Path):
    """The tiny CLIP encoders of a components folder."""
    from transformers import CLIPImageProcessorPil, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

    from ..dataset import ClipEncoders

    return ClipEncoders(
        tokenizer=CLIPTokenizer.from_pretrained(components / "tokenizer"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(components / "text_encoder").eval(),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(components / "image_encoder").eval(),
        image_processor=CLIPImageProcessorPil.from_pretrained(components / "image_processor"),
    )


def assemble_bundle(components: Path, prior_dir: Path, out: Path) -> Path:
    """Write one pipeline folder (model_index.json + every component) atomically."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

    from ..pipeline import LambdaEclipsePipeline
    from ..prior import LambdaEclipsePrior

    encoders = load_encoders(components)
    pipe = LambdaEclipsePipeline(
        prior=LambdaEclipsePrior.from_pretrained(prior_dir), text_encoder=encoders.text_encoder,
        tokenizer=encoders.tokenizer, image_encoder=encoders.image_encoder, image_processor=encoders.image_processor,
        # stored in float16 (loaded as float32): half the disk, and the eval's figures were identical
        unet=UNet2DConditionModel.from_pretrained(components / "unet", torch_dtype=torch.float16),
        scheduler=DDPMScheduler.from_pretrained(components / "scheduler"),
        movq=VQModel.from_pretrained(components / "movq"),
    )
    with atomic_dir(out) as temporary:
        pipe.save_pretrained(temporary)
    return out


PriorRun = tuple[str, float, tuple[str, ...]]  # (folder under priors/, λ, train-prior overrides)


def _prior_runs(plan: MiniworldBuild) -> list[PriorRun]:
    """The shipped prior first, then the λ sweep."""
    runs = [(f"lambda-{SHIPPED_LAMBDA}", SHIPPED_LAMBDA, plan.prior_overrides)]
    if plan.sweep:
        runs += [(f"sweep-lambda-{lam}", lam, plan.prior_overrides + plan.sweep_overrides) for lam in SWEEP_LAMBDAS]
    return runs


def _prior_done(out: Path, name: str) -> bool:
    return (out / "priors" / name / "prior" / "config.json").is_file()


def _claim(out: Path, name: str, lane: str) -> bool:
    """Atomically take a prior run for one lane (creating ``priors/NAME/.lane`` fails if the other lane has it)."""
    run = out / "priors" / name
    run.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(run / ".lane", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, lane.encode())
    os.close(fd)
    return True


def _features_ready(out: Path, plan: MiniworldBuild) -> bool:
    from ..features import read_index

    return all(
        (out / "features" / split / "index.json").is_file()
        and read_index(out / "features" / split).num_samples >= n
        for split, n in (("train", plan.features.train_scenes), ("heldout", plan.features.val_scenes))
    )


def _train_claimed_priors(out: Path, plan: MiniworldBuild, lane: str, log, shipped_only: bool = False) -> None:
    """Train every prior run (or just the shipped one) that is neither finished nor taken by the other lane."""
    for name, lam, overrides in _prior_runs(plan)[:1] if shipped_only else _prior_runs(plan):
        if _prior_done(out, name) or not _claim(out, name, lane):
            continue
        log(f"[{lane}] training the prior {name} (λ={lam})")
        train_miniworld_prior(out / "features" / "train", out / "features" / "heldout", out / "priors" / name, lam,
                              overrides)


def _train_oracle(out: Path, plan: MiniworldBuild, size: int, movq_dir: Path) -> None:
    from .oracle import train_oracle

    if not (out / "oracle" / "oracle.json").is_file():
        train_oracle(out / "oracle", size=size, steps=plan.oracle_steps, seed=0, scenes=plan.oracle_scenes,
                     eval_scenes=min(1000, plan.oracle_scenes), movq_dir=movq_dir, work_dir=out / "work" / "oracle")


def _second_lane(out: Path, plan: MiniworldBuild, config, verify_steps: int) -> None:
    """One core's share: the UNet (the longest stage), then any sweep priors the first lane has not taken yet."""
    import torch

    from .build import build_components

    build_components(out / "components-build", config, verify_steps, ("unet", "colour"))
    if _features_ready(out, plan):  # they are written first on the other lane, normally long before this
        torch.set_num_threads(1)
        _train_claimed_priors(out, plan, "second", _log)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] miniworld: {message}", flush=True)


def build_miniworld(out_dir: str | Path, plan: MiniworldBuild | None = None, install: str | Path | None = None) -> Path:
    """Run every stage into ``out_dir``; returns the bundle folder (copied to ``install`` when given)."""
    import torch

    from .build import BuildConfig, build_components, smoke_config, stages_complete

    plan = plan or MiniworldBuild()
    out = Path(out_dir)
    config = smoke_config() if plan.smoke_components else plan.components or BuildConfig()
    components_dir, verify_steps = out / "components-build", 5 if plan.smoke_components else 50
    torch.set_num_threads(plan.threads)
    # the encoders and the MoVQ first: every later stage reads them
    components = build_components(components_dir, replace(config, threads=plan.threads), verify_steps, ("clip", "movq"))
    # Then two lanes of one thread each (small models use two 1-thread processes better than one 2-thread one):
    # the second runs the UNet (the longest stage, 66 min measured), this one the features, the shipped prior and the
    # oracle (55 min), and both then take the sweep's priors as they come free (a claim file per run). That balance
    # is what keeps the full build inside its 2-hour budget on 2 cores (112 min measured from an empty folder).
    for claim in (out / "priors").glob("*/.lane"):  # claims of an interrupted earlier build
        claim.unlink()
    second = None
    if plan.threads >= 2:
        second = multiprocessing.get_context("spawn").Process(
            target=_second_lane, args=(out, plan, replace(config, threads=1), verify_steps),
            name="miniworld-second-lane", daemon=True,
        )
        second.start()
        _log(f"second lane (UNet, then sweep priors) started in process {second.pid} (1 thread)")
    lane_threads = plan.threads - 1 if second is not None else plan.threads
    torch.set_num_threads(lane_threads)
    encoders = load_encoders(components)
    _log("encoding features")
    write_scene_features(encoders, out / "features" / "train", plan.features.train_scenes, "train", config.size,
                         plan.features)
    write_scene_features(encoders, out / "features" / "heldout", plan.features.val_scenes, "heldout", config.size,
                         plan.features)
    _train_claimed_priors(out, plan, "first", _log, shipped_only=True)
    _train_oracle(out, plan, config.size, components / "movq")
    _train_claimed_priors(out, plan, "first", _log)
    if second is not None:
        _log("waiting for the second lane")
        second.join()
        if second.exitcode != 0:
            raise RuntimeError(f"the second lane failed (exit code {second.exitcode}, its log is above); "
                               "rerun the same command to resume it from its last checkpoints")
    # whatever the second lane did not do (one thread, or it stopped early) is done here; finished parts are skipped
    torch.set_num_threads(plan.threads)
    if not stages_complete(components_dir, ("unet", "colour")):  # checked here: the stages reload the pools
        build_components(components_dir, replace(config, threads=plan.threads), verify_steps, ("unet", "colour"))
    for claim in (out / "priors").glob("*/.lane"):
        claim.unlink()
    _train_claimed_priors(out, plan, "first", _log)
    bundle = assemble_bundle(components, out / "priors" / f"lambda-{SHIPPED_LAMBDA}" / "prior", out / "bundle")
    _log(f"bundle written to {bundle}")
    if install is not None:
        install = Path(install)
        oracle_install = oracle_install_path(install)
        _replace_copy(bundle, install)
        # the judge travels beside the model, so `miniworld eval` runs from a checkout without a build
        _replace_copy(out / "oracle", oracle_install)
        _log(f"installed to {install} (oracle: {oracle_install})")
    return bundle


def oracle_install_path(install: str | Path) -> Path:
    """Where `--install DIR` puts the oracle: ``DIR-oracle`` beside the bundle (models/miniworld-oracle)."""
    install = Path(install)
    return install.with_name(f"{install.name}-oracle")


def _replace_copy(source: Path, target: Path) -> None:
    """Copy the folder ``source`` over ``target``; readers see the old folder or the new one, never half."""
    with atomic_dir(target) as temporary:
        shutil.copytree(source, temporary, dirs_exist_ok=True)
