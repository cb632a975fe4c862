"""Ends decoded from the CLIP embeddings of the same scene rendered in colour A and in colour B (same place): does the
decoded subject keep its place? And the prior's ends: distance of each to the true place."""
import sys, torch, numpy as np
from PIL import Image
torch.set_num_threads(2)
from lambda_eclipse.pipeline import LambdaEclipsePipeline
from lambda_eclipse.miniworld.oracle import load_oracle
from lambda_eclipse.miniworld.evaluate import clip_features
from lambda_eclipse.miniworld.scenes import render_scene
from lambda_eclipse.miniworld.interpolation_eval import InterpolationEvalConfig, one_subject_scenes, other_colour, subject_picture
from lambda_eclipse.interpolation import Corner
from lambda_eclipse.cli import BUNDLED_ORACLE
pipe = LambdaEclipsePipeline.from_pretrained("models/miniworld"); pipe.set_progress_bar_config(disable=True)
oracle = load_oracle(str(BUNDLED_ORACLE)); cfg = InterpolationEvalConfig(); size = 32
kw = dict(seed=cfg.seed, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, scheduler=cfg.scheduler, output_type="np")
rows = []
for scene in one_subject_scenes(int(sys.argv[1]), cfg.seed, size):
    obj = scene.objects[0]; b = other_colour(obj.colour); prompt = scene.captions["appearance_free"]
    sb = render_scene(scene.seed, size, "heldout", recolour={0: b})
    true = clip_features(pipe, [Image.fromarray(scene.image), Image.fromarray(sb.image)])[0]
    t_fr = pipe.interpolate([true[0], true[1]], steps=2, **kw).images
    corners = [Corner(prompt, {obj.noun: Image.fromarray(obj.crop)}), Corner(prompt, {obj.noun: subject_picture(obj.shape, b, obj.texture, size)})]
    p_fr = pipe.interpolate(corners, steps=2, **kw).images
    where = np.array([(obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2])
    def centres(fr):
        fr = np.round(np.clip(fr, 0, 1) * 255).astype(np.uint8)
        return [np.array(x.shapes[obj.shape].centre) * size for x in oracle.read(fr)]
    tc, pc = centres(t_fr), centres(p_fr)
    rows.append((np.linalg.norm(tc[0] - tc[1]), np.linalg.norm(pc[0] - pc[1]), np.linalg.norm(tc[0] - where), np.linalg.norm(pc[0] - where), np.linalg.norm(pc[1] - where)))
    print(obj.shape, obj.colour, b, "true-embedding ends apart %.1f px | prior ends apart %.1f px | A from scene's place: true %.1f, prior %.1f; prior B %.1f" % rows[-1], flush=True)
r = np.array(rows)
print("median px: true ends apart %.1f, prior ends apart %.1f, true A to place %.1f, prior A to place %.1f, prior B to place %.1f" % tuple(np.median(r, 0)))
