"""Pilot (issue 13): 7 frames placed at even CLIP-I arc length along the slerp line. The line is first decoded at 9
    positions, then the 4 widest CLIP-I steps are bisected until N decodes; usage: [MODEL=DIR THREADS=K] python docs/colour-continuum/even_spacing.py LINES N"""
import os, sys, torch, numpy as np, torch.nn.functional as F
from PIL import Image
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from lambda_eclipse.pipeline import LambdaEclipsePipeline
from lambda_eclipse.miniworld.oracle import load_oracle
from lambda_eclipse.miniworld.interpolation_eval import InterpolationEvalConfig, one_subject_scenes, other_colour, subject_picture, score_line
from lambda_eclipse.miniworld.evaluate import clip_features
from lambda_eclipse.interpolation import Corner
from lambda_eclipse.cli import BUNDLED_ORACLE
pipe = LambdaEclipsePipeline.from_pretrained(os.environ.get("MODEL", "models/miniworld")); pipe.set_progress_bar_config(disable=True)
oracle = load_oracle(str(BUNDLED_ORACLE)); cfg = InterpolationEvalConfig(); size = 32
n, dense = int(sys.argv[1]), int(sys.argv[2])
def run(corners, ts):
    out = pipe.interpolate(corners, steps=cfg.frames, path="slerp", seed=cfg.seed, positions=[(0.0, float(t)) for t in ts],
                           num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, scheduler=cfg.scheduler, output_type="np")
    return np.round(np.clip(out.images, 0, 1) * 255).astype(np.uint8)
def neighbour_steps(feats):
    """CLIP-I steps (1 - cosine) between neighbouring positions, and the positions sorted."""
    ts = np.array(sorted(feats)); f = torch.stack([feats[t] for t in ts])
    return ts, (1 - (f[:-1] * f[1:]).sum(-1)).numpy()
res = []
for scene in one_subject_scenes(n, cfg.seed, size):
    obj = scene.objects[0]; b = other_colour(obj.colour); prompt = scene.captions["appearance_free"]
    corners = [Corner(prompt, {obj.noun: Image.fromarray(obj.crop)}), Corner(prompt, {obj.noun: subject_picture(obj.shape, b, obj.texture, size)})]
    ts = np.linspace(0, 1, 9); feats = {}
    def feat(new):
        fr = run(corners, new)
        for t, x in zip(new, F.normalize(clip_features(pipe, [Image.fromarray(y) for y in fr])[0], dim=-1)): feats[float(t)] = x
    feat(ts)
    while len(feats) < dense:
        ts, st = neighbour_steps(feats)
        worst = np.argsort(-st)[:4]
        feat([(ts[i] + ts[i + 1]) / 2 for i in worst])
    ts, st = neighbour_steps(feats); cum = np.concatenate([[0], np.cumsum(st)])
    even_t = np.interp(np.linspace(0, cum[-1], cfg.frames), cum, ts)
    uni = score_line(pipe, oracle, run(corners, np.linspace(0, 1, cfg.frames)), obj, b)
    ev = score_line(pipe, oracle, run(corners, even_t), obj, b)
    res.append((uni, ev))
    print(obj.shape, obj.colour, b, "dense max/total", round(float(st.max() / cum[-1]), 3), "t", even_t.round(3).tolist(),
          "| uniform", uni["found_every_frame"], uni["direction_changes"], round(uni["max_over_mean_step"], 2),
          "| even", ev["found_every_frame"], ev["direction_changes"], round(ev["max_over_mean_step"], 2), flush=True)
for k, name in enumerate(("uniform", "even")):
    r = [x[k] for x in res]
    print(name, "found", np.mean([x["found_every_frame"] for x in r]), "<=1 turn", np.mean([x["direction_changes"] <= 1 for x in r]),
          "even", np.mean([x["even"] for x in r]), "median", np.median([x["max_over_mean_step"] for x in r]))
