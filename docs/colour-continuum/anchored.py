"""Frames decoded by img2img from one anchor picture (the line's A-corner image), at several strengths.

usage: [MODEL=DIR] python docs/colour-continuum/anchored.py LINES STRENGTHS [true]
true: the line's ends are the CLIP image embeddings of the scene rendered in colour A and in colour B (one layout),
the condition ``miniworld colour-unet`` trains its colour pairs on, instead of the prior's embeddings."""
import os, sys, torch, numpy as np
from pathlib import Path
from PIL import Image
torch.set_num_threads(1)
from lambda_eclipse.pipeline import LambdaEclipsePipeline
from lambda_eclipse.miniworld.oracle import load_oracle
from lambda_eclipse.miniworld.interpolation_eval import InterpolationEvalConfig, one_subject_scenes, other_colour, subject_picture, score_line
from lambda_eclipse.interpolation import Corner
from lambda_eclipse.decoding import decode_image_embeds, decoder_scheduler
from lambda_eclipse.cli import BUNDLED_ORACLE
from lambda_eclipse.miniworld.evaluate import clip_features
from lambda_eclipse.miniworld.scenes import render_scene
pipe = LambdaEclipsePipeline.from_pretrained(os.environ.get("MODEL", "models/miniworld")); pipe.set_progress_bar_config(disable=True)
oracle = load_oracle(str(BUNDLED_ORACLE)); cfg = InterpolationEvalConfig(); size = 32
n = int(sys.argv[1]); strengths = [float(s) for s in sys.argv[2].split(",")]; true_ends = sys.argv[3:] == ["true"]
kw = dict(seed=cfg.seed, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, scheduler=cfg.scheduler)
out = Path("runs/colour-continuum"); out.mkdir(parents=True, exist_ok=True)  # frame grids
rows = {s: [] for s in strengths}; grids = {s: [] for s in strengths}
for scene in one_subject_scenes(n, cfg.seed, size):
    obj = scene.objects[0]; b = other_colour(obj.colour); prompt = scene.captions["appearance_free"]
    corners = [Corner(prompt, {obj.noun: Image.fromarray(obj.crop)}), Corner(prompt, {obj.noun: subject_picture(obj.shape, b, obj.texture, size)})]
    if true_ends:
        pictures = [scene.image, render_scene(scene.seed, size, "heldout", recolour={0: b}).image]
        corners = list(clip_features(pipe, [Image.fromarray(x) for x in pictures])[0])
    e = pipe.interpolate(corners, steps=cfg.frames, output_type="embeds", **kw)
    anchor = pipe.interpolate(corners, steps=2, output_type="pil", **kw).images[0]
    for s in strengths:
        fr = decode_image_embeds(pipe.unet, decoder_scheduler(pipe.scheduler, cfg.scheduler), pipe.movq, e.image_embeds, e.negative_image_embeds,
                                 size, size, cfg.num_inference_steps, cfg.guidance_scale,
                                 [torch.Generator().manual_seed(cfg.seed) for _ in range(cfg.frames)], "np", image=anchor, strength=s)
        fr = np.round(np.clip(fr, 0, 1) * 255).astype(np.uint8)
        r = score_line(pipe, oracle, fr, obj, b); rows[s].append(r); grids[s].append(fr)
        print(obj.shape, obj.colour, b, s, "found", r["found_every_frame"], "reading_b", [round(v, 2) for v in r["reading_b"]], "max/mean", round(r["max_over_mean_step"], 2), flush=True)
for s, r in rows.items():
    print(s, "found", np.mean([x["found_every_frame"] for x in r]), "A->B", np.mean([x["a_to_b"] for x in r]), "<=1 turn", np.mean([x["direction_changes"] <= 1 for x in r]),
          "even", np.mean([x["even"] for x in r]), "median max/mean", np.median([x["max_over_mean_step"] for x in r]),
          "all", np.mean([x["found_every_frame"] and x["direction_changes"] <= 1 and x["even"] and x["a_to_b"] for x in r]), flush=True)
    g = np.concatenate([np.concatenate(list(f), 1) for f in grids[s]], 0)
    Image.fromarray(g).resize((g.shape[1] * 3, g.shape[0] * 3), Image.NEAREST).save(out / f"anchored-{s}{'-true' * true_ends}.png")
