"""Does the subject keep its place between the line's ends? Oracle centres of the subject along the shipped lines;
    usage: python docs/colour-continuum/subject_place.py LINES [edge] (edge: the scene as both corners' edge map)."""
import sys, json, torch, numpy as np
from PIL import Image
torch.set_num_threads(2)
from lambda_eclipse.pipeline import LambdaEclipsePipeline
from lambda_eclipse.miniworld.oracle import load_oracle
from lambda_eclipse.miniworld.interpolation_eval import InterpolationEvalConfig, one_subject_scenes, other_colour, subject_picture, score_line
from lambda_eclipse.interpolation import Corner
from lambda_eclipse.cli import BUNDLED_ORACLE
pipe = LambdaEclipsePipeline.from_pretrained("models/miniworld"); pipe.set_progress_bar_config(disable=True)
oracle = load_oracle(str(BUNDLED_ORACLE)); cfg = InterpolationEvalConfig(); size = 32
EDGE = len(sys.argv) > 2 and sys.argv[2] == "edge"
out = []
for scene in one_subject_scenes(int(sys.argv[1]), cfg.seed, size):
    obj = scene.objects[0]; b = other_colour(obj.colour); prompt = scene.captions["appearance_free"]
    edge = Image.fromarray(scene.image) if EDGE else None
    corners = [Corner(prompt, {obj.noun: Image.fromarray(obj.crop)}, edge), Corner(prompt, {obj.noun: subject_picture(obj.shape, b, obj.texture, size)}, edge)]
    o = pipe.interpolate(corners, steps=cfg.frames, path="slerp", seed=cfg.seed, num_inference_steps=cfg.num_inference_steps,
                         guidance_scale=cfg.guidance_scale, scheduler=cfg.scheduler, output_type="np")
    fr = np.round(np.clip(o.images, 0, 1) * 255).astype(np.uint8)
    r = score_line(pipe, oracle, fr, obj, b)
    cen = [np.array(x.shapes[obj.shape].centre) * size for x in oracle.read(fr)]
    moved = float(np.linalg.norm(cen[0] - cen[-1]))
    out.append({"shape": obj.shape, "a": obj.colour, "b": b, "moved_px": round(moved, 1), "max_over_mean": round(r["max_over_mean_step"], 2),
                "even": r["even"], "found": r["found_every_frame"]})
    print(json.dumps(out[-1]), flush=True)
moved = np.array([x["moved_px"] for x in out]); ratio = np.array([x["max_over_mean"] for x in out])
for lo, hi in ((0, 3), (3, 1e9)):
    sel = (moved >= lo) & (moved < hi)
    print(f"ends {lo}-{hi} px apart: {sel.sum()} lines, median max/mean {np.median(ratio[sel]) if sel.any() else float('nan'):.2f}, even {np.mean([x['even'] for x, s in zip(out, sel) if s]) if sel.any() else float('nan'):.2f}")
print("spearman-ish: corr(moved, ratio) =", round(float(np.corrcoef(moved, ratio)[0, 1]), 2))
