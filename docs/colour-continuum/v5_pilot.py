"""v5 pilot (warm start): the shipped CLIP continued with colour heads on a colour_mix pool (off-palette objects
unnamed), then two lanes: features + prior from scratch | the shipped UNet continued on colour_mix scenes encoded
with the new CLIP. Usage: python runs/v5/pilot.py clip|prior|unet|bundle"""
import shutil, sys
from dataclasses import replace
from pathlib import Path
import torch
from lambda_eclipse.miniworld.build import BuildConfig
from lambda_eclipse.miniworld.clip_recipe import run_clip_stage
from lambda_eclipse.miniworld.data import load_or_render_pool
from lambda_eclipse.miniworld.unet_recipe import ColourRecipe, UNetRecipe, run_colour_stage
from lambda_eclipse.miniworld.bundle import MiniworldBuild, assemble_bundle, load_encoders
from lambda_eclipse.miniworld.prior_stage import train_miniworld_prior, write_scene_features

OUT = Path("runs/v5p"); COMP = OUT / "components"; SHIPPED = Path("models/miniworld")
base = BuildConfig()
CLIP = replace(base.clip, colour_loss=10.0, position_loss=1.0, init_from=str(SHIPPED), steps=800, lr=5e-4, warmup=50)
COLOUR = ColourRecipe(steps=3000, lr=3e-4, warmup=100, colour_mix=0.5, scenes=30000, pairs=0)
stage = sys.argv[1]
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
if stage == "clip":
    pool = load_or_render_pool(OUT / "work" / "pool-train.npz", 50000, 0, 32, "train", colour_mix=0.5)
    heldout = load_or_render_pool(OUT / "work" / "pool-heldout.npz", 512, 0, 32, "heldout")
    print(run_clip_stage(pool, heldout, OUT / "work" / "clip", COMP, CLIP, 0, 32), flush=True)
    for name in ("movq", "unet", "scheduler"):
        if not (COMP / name).exists():
            shutil.copytree(SHIPPED / name, COMP / name)
elif stage == "prior":
    plan = MiniworldBuild(sweep=False)
    enc = load_encoders(COMP)
    write_scene_features(enc, OUT / "features" / "train", plan.features.train_scenes, "train", 32, plan.features)
    write_scene_features(enc, OUT / "features" / "heldout", plan.features.val_scenes, "heldout", 32, plan.features)
    train_miniworld_prior(OUT / "features" / "train", OUT / "features" / "heldout", OUT / "priors" / "lambda-0.2", 0.2, ())
elif stage == "unet":
    print(run_colour_stage(COMP, OUT / "work" / "unet-colour", COLOUR, UNetRecipe(), 0, 32, half=True), flush=True)
elif stage == "bundle":
    print(assemble_bundle(COMP, OUT / "priors" / "lambda-0.2" / "prior", OUT / "bundle"))
