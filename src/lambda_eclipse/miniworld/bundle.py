"""`lambda-eclipse miniworld build`: the whole miniature model family, step-bounded, seeded and resumable.

Stages (each skipped when its output is complete, each resumable after a kill):
  components  tiny CLIP, MoVQ and Kandinsky-2.2-style UNet          (:mod:`.build`)
  features    train and held-out feature stores through the feature store (:mod:`.prior_stage`)
  priors      the shipped prior (λ = 0.2, configs/prior-miniworld.yaml), and for the λ sweep three shorter
              priors of one recipe (λ = 0, 0.2, 0.5; `sweep_overrides`), all with `train-prior`
  oracle      the concept judge for `miniworld eval`                 (:mod:`.oracle`)
  bundle      one diffusers-style folder that LambdaEclipsePipeline.from_pretrained loads
"""

from __future__ import annotations

import multiprocessing
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .prior_stage import FeatureRecipe, train_miniworld_prior, write_scene_features
from .training import atomic_dir

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

    from ..build import ClipEncoders

    return ClipEncoders(
        tokenizer=CLIPTokenizer.from_pretrained(components / "tokenizer"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(components / "text_encoder").eval(),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(components / "image_encoder").eval(),
        image_processor=CLIPImageProcessorPil.from_pretrained(components / "image_processor"),
    )


def assemble_bundle(components: Path, prior_dir: Path, out: Path) -> Path:
    """Write one pipeline folder (model_index.json + every component) atomically."""
    from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

    from ..pipeline import LambdaEclipsePipeline
    from ..prior import LambdaEclipsePrior

    encoders = load_encoders(components)
    pipe = LambdaEclipsePipeline(
        prior=LambdaEclipsePrior.from_pretrained(prior_dir), text_encoder=encoders.text_encoder,
        tokenizer=encoders.tokenizer, image_encoder=encoders.image_encoder, image_processor=encoders.image_processor,
        unet=UNet2DConditionModel.from_pretrained(components / "unet"),
        scheduler=DDPMScheduler.from_pretrained(components / "scheduler"),
        movq=VQModel.from_pretrained(components / "movq"),
    )
    with atomic_dir(out) as temporary:
        pipe.save_pretrained(temporary)
    return out


def build_miniworld(out_dir: str | Path, plan: MiniworldBuild | None = None, install: str | Path | None = None) -> Path:
    """Run every stage into ``out_dir``; returns the bundle folder (copied to ``install`` when given)."""
    import torch

    from .build import BuildConfig, build_components, components_complete, smoke_config
    from .oracle import train_oracle

    plan = plan or MiniworldBuild()
    out = Path(out_dir)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] miniworld: {message}", flush=True)

    config = smoke_config() if plan.smoke_components else BuildConfig()
    components_dir, verify_steps = out / "components-build", 5 if plan.smoke_components else 50
    torch.set_num_threads(plan.threads)
    # the encoders and the MoVQ first: every later stage reads them
    components = build_components(components_dir, replace(config, threads=plan.threads), verify_steps, ("clip", "movq"))
    # Then two branches that need each other only at the end: the UNet (the longest stage) in its own process on
    # one core, and features → priors → oracle here on the rest. Small models use two 1-thread processes better
    # than one 2-thread process, which is what keeps the full build inside its 2-hour budget on 2 cores.
    unet_branch = None
    if plan.threads >= 2 and not components_complete(components, ("unet", "scheduler")):
        unet_branch = multiprocessing.get_context("spawn").Process(
            target=build_components, args=(components_dir, replace(config, threads=1), verify_steps, ("unet",)),
            name="miniworld-unet", daemon=True,
        )
        unet_branch.start()
        log(f"UNet stage started in process {unet_branch.pid} (1 thread)")
    threads = plan.threads - 1 if unet_branch is not None else plan.threads
    torch.set_num_threads(threads)
    size = config.size
    encoders = load_encoders(components)
    log("encoding features")
    train = write_scene_features(encoders, out / "features" / "train", plan.features.train_scenes, "train", size, plan.features)
    val = write_scene_features(encoders, out / "features" / "heldout", plan.features.val_scenes, "heldout", size, plan.features)
    runs = {("shipped", SHIPPED_LAMBDA): plan.prior_overrides}
    if plan.sweep:
        runs.update({("sweep", lam): plan.prior_overrides + plan.sweep_overrides for lam in SWEEP_LAMBDAS})
    priors = {}
    for (kind, lam), overrides in runs.items():
        run = out / "priors" / (f"lambda-{lam}" if kind == "shipped" else f"sweep-lambda-{lam}")
        if (run / "prior" / "config.json").is_file():
            priors[kind, lam] = run / "prior"
            continue
        log(f"training the {kind} prior with λ={lam}")
        priors[kind, lam] = train_miniworld_prior(train, val, run, lam, overrides)
    if not (out / "oracle" / "oracle.json").is_file():
        log("training the oracle")
        train_oracle(out / "oracle", size=size, steps=plan.oracle_steps, seed=0, threads=threads,
                     scenes=plan.oracle_scenes, eval_scenes=min(1000, plan.oracle_scenes), movq_dir=components / "movq")
    if unet_branch is not None:
        log("waiting for the UNet stage")
        unet_branch.join()
        if unet_branch.exitcode != 0:
            raise RuntimeError(f"the UNet stage failed (exit code {unet_branch.exitcode}, its log is above); "
                               "rerun the same command to resume it from its last checkpoint")
    else:  # one thread, or the UNet was already built: run (or skip) it here
        torch.set_num_threads(plan.threads)
        build_components(components_dir, replace(config, threads=plan.threads), verify_steps, ("unet",))
    bundle = assemble_bundle(components, priors["shipped", SHIPPED_LAMBDA], out / "bundle")
    log(f"bundle written to {bundle}")
    if install is not None:
        install = Path(install)
        oracle_install = oracle_install_path(install)
        _replace_copy(bundle, install)
        # the judge travels beside the model, so `miniworld eval` runs from a checkout without a build
        _replace_copy(out / "oracle", oracle_install)
        log(f"installed to {install} (oracle: {oracle_install})")
    return bundle


def oracle_install_path(install: str | Path) -> Path:
    """Where `--install DIR` puts the oracle: ``DIR-oracle`` beside the bundle (models/miniworld-oracle)."""
    install = Path(install)
    return install.with_name(f"{install.name}-oracle")


def _replace_copy(source: Path, target: Path) -> None:
    """Copy the folder ``source`` over ``target``; readers see the old folder or the new one, never half."""
    with atomic_dir(target) as temporary:
        shutil.copytree(source, temporary, dirs_exist_ok=True)
