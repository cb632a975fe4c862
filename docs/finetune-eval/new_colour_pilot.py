"""Pilot (issue 12): the eight fine-tuned concepts of `finetune-eval` painted in a colour the bundle never drew.

Usage, from the repository root: NOVEL=120,20,30 TAG=maroon python docs/finetune-eval/new_colour_pilot.py STEPS LR [MODE]
e.g. `200,400 1e-4 full`. The oracle has no class for the new colour, so "colour right" for those concepts is read
from pixels (`judge`): in the box of the object's size at the oracle's centre, each pixel takes the nearest of the
palette colours, the new colour (each with its texture mixes) and the backgrounds; the object's colour is the
commonest object colour. Control concepts are scored by the same judge and by the oracle. Results:
docs/finetune-eval/diagnostics.md ("A colour the bundle never drew").
"""
import json, os, sys, time
from pathlib import Path
import numpy as np, torch
from PIL import Image
from lambda_eclipse.miniworld import finetune_eval as fe
from lambda_eclipse.miniworld.scenes import render_scene, SIZE_FRACTION
from lambda_eclipse.miniworld.vocab import COLOURS, BG_COLOURS
from lambda_eclipse.miniworld.draw import contrast_colour

torch.set_num_threads(1)
NOVEL = tuple(float(v) for v in os.environ.get("NOVEL", "120,20,30").split(","))
MODEL = "models/miniworld"
ORACLE = "src/lambda_eclipse/models/miniworld-oracle"
work = Path("runs/new-colour-pilot-" + os.environ.get("TAG", "maroon")); work.mkdir(parents=True, exist_ok=True)

def refs():
    names, cols = [], []
    for n, c in list(COLOURS.items()) + [("novel", NOVEL)]:
        c = np.array(c, float); d = contrast_colour(c)
        for w in (0, 0.25, 0.5, 0.75, 1): names.append(n); cols.append(c * (1 - w) + d * w)
    for c in BG_COLOURS.values():
        c = np.array(c, float)
        for s in np.linspace(0.6, 1.3, 8):
            names.append("bg"); cols.append(np.clip(c * s, 0, 255))
        names.append("bg"); cols.append(contrast_colour(c))
    return np.array(names), np.array(cols)
NAMES, COLS = refs()

def judge(image, reading, obj, size):
    r = reading.shapes[obj.shape]
    half = SIZE_FRACTION[obj.size] * size / 2
    cx, cy = r.centre[0] * size, r.centre[1] * size
    x0, x1 = int(max(0, round(cx - half))), int(min(size, round(cx + half)))
    y0, y1 = int(max(0, round(cy - half))), int(min(size, round(cy + half)))
    px = image[y0:y1, x0:x1].reshape(-1, 3).astype(float)
    if len(px) == 0: return "none"
    lab = NAMES[((px[:, None, :] - COLS[None]) ** 2).sum(-1).argmin(1)]
    lab = lab[lab != "bg"]
    if len(lab) == 0: return "none"
    v, c = np.unique(lab, return_counts=True)
    return v[c.argmax()]

def recolour(scene, i):
    return render_scene(scene.seed, scene.size, scene.split, recolour={i: NOVEL})

def main():
    from lambda_eclipse.pipeline import LambdaEclipsePipeline
    from lambda_eclipse.miniworld.evaluate import EvalConfig, clip_features, subject_embeddings, decode
    from lambda_eclipse.miniworld.oracle import load_oracle
    from lambda_eclipse.train.core import run_training
    from lambda_eclipse.train.finetune import load_finetune_config, loop_settings, prepare_finetune
    steps = [int(s) for s in sys.argv[1].split(",")]
    lr = float(sys.argv[2]); mode = sys.argv[3] if len(sys.argv) > 3 else "full"
    pipe = LambdaEclipsePipeline.from_pretrained(MODEL); pipe.set_progress_bar_config(disable=True)
    oracle = load_oracle(ORACLE); size = 32
    tuned, control = fe.split_instances()
    sets = {"finetuned": fe.eval_prompts(tuned, control, 6, 7001, size),
            "control": fe.eval_prompts(control, tuned, 6, 7001, size)}
    sets["finetuned"] = [(recolour(s, i), i) for s, i in sets["finetuned"]]
    ecfg = EvalConfig(images_per_prompt=2)
    # judge validation on renders
    for name, p in sets.items():
        imgs = np.stack([s.image for s, _ in p]); rd = oracle.read(imgs)
        j = [judge(imgs[k], rd[k], s.objects[i], size) for k, (s, i) in enumerate(p)]
        want = ["novel" if name == "finetuned" else s.objects[i].colour for s, i in p]
        print(name, "judge on renders:", np.mean([a == b for a, b in zip(j, want)]),
              "oracle found:", np.mean([rd[k].shapes[s.objects[i].shape].present >= .5 for k, (s, i) in enumerate(p)]), flush=True)
    embeds = {n: subject_embeddings(pipe, [s for s, _ in p], [clip_features(pipe, [Image.fromarray(o.crop) for o in s.objects])[0] for s, _ in p], ecfg) for n, p in sets.items()}
    def score(tag):
        out = {}
        for name, p in sets.items():
            imgs = decode(pipe, embeds[name], ecfg, size); rd = oracle.read(imgs)
            rows = []
            for k in range(len(imgs)):
                s, i = p[k // 2]; obj = s.objects[i]; r = rd[k].shapes[obj.shape]
                found = r.present >= .5
                j = judge(imgs[k], rd[k], obj, size)
                want = "novel" if name == "finetuned" else obj.colour
                rows.append((found, found and j == want, found and r.colour == obj.colour, len(s.objects), j))
            rows_a = np.array([r[:4] for r in rows], float)
            out[name] = {"found": rows_a[:, 0].mean(), "found_judge_right": rows_a[:, 1].mean(), "found_oracle_right": rows_a[:, 2].mean(),
                         "by_n": [rows_a[rows_a[:, 3] == n, 1].mean() for n in (1, 2, 3)],
                         "judged": dict(zip(*np.unique([r[4] for r in rows], return_counts=True)))}
            out[name]["judged"] = {k: int(v) for k, v in out[name]["judged"].items()}
            Image.fromarray(np.concatenate([np.concatenate(list(imgs[r*12:(r+1)*12]), 1) for r in range(len(imgs)//12)], 0)).resize((12*64, len(imgs)//12*64), Image.NEAREST).save(work / f"{tag}-{name}.png")
        print(tag, json.dumps(out), flush=True)
    score("bundle")
    cdir = fe.write_concepts_folder(tuned, 96, 7002, size, work / "concepts", colour=NOVEL)
    original = pipe.unet
    config = load_finetune_config(None, [f"data.concepts_dir={cdir}", f"model.decoder={MODEL}", f"model.encoders={MODEL}",
        f"mode={mode}", f"optim.lr={lr}", "lora.rank=8", "data.batch_size=16", "loss.cond_dropout=0.1", "mixed_precision=no",
        "log_with=none", "progress=false"], output_dir=str(work / f"{mode}-{lr}"), max_steps=max(steps), checkpoint_every=min(steps))
    objective = prepare_finetune(config)
    done = 0
    for st in steps:
        t = time.time()
        run = run_training(objective, loop_settings(config), stop_after=st - done); done = st
        pipe.unet = run.model.eval()
        print("trained to", st, "in", round(time.time() - t), "s", flush=True)
        score(f"{mode}-{lr}@{st}")
        pipe.unet = original

if __name__ == "__main__":
    main()
