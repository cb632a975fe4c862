"""CLIP-only check of a components folder: rendered RGB ramps (the interpolation-eval lines' scenes) — CLIP-I
evenness of neighbour steps, and how close slerp(emb(A), emb(B), t) lies to emb(ramp at t)."""
import sys
from types import SimpleNamespace
import numpy as np, torch, torch.nn.functional as F
from PIL import Image
from transformers import CLIPVisionModelWithProjection, CLIPImageProcessorPil
from lambda_eclipse.miniworld.interpolation_eval import one_subject_scenes, other_colour
from lambda_eclipse.miniworld.evaluate import clip_features
from lambda_eclipse.miniworld.scenes import render_scene
from lambda_eclipse.miniworld.vocab import COLOURS

comp = sys.argv[1]
pipe = SimpleNamespace(image_encoder=CLIPVisionModelWithProjection.from_pretrained(f"{comp}/image_encoder").eval(),
                       image_processor=CLIPImageProcessorPil.from_pretrained(f"{comp}/image_processor"))
even, ratios, offarc = [], [], []
ts = np.linspace(0, 1, 7)
for scene in one_subject_scenes(20, 0, 32):
    obj = scene.objects[0]; b = other_colour(obj.colour)
    a_rgb, b_rgb = np.array(COLOURS[obj.colour], float), np.array(COLOURS[b], float)
    renders = [render_scene(scene.seed, 32, "heldout", recolour={0: tuple(float(round(v)) for v in (1 - t) * a_rgb + t * b_rgb)}).image for t in ts]
    raw = clip_features(pipe, [Image.fromarray(r) for r in renders])[0]
    f = F.normalize(raw, dim=-1)
    steps = (1 - (f[:-1] * f[1:]).sum(-1)).numpy()
    even.append(steps.max() <= 2 * steps.mean()); ratios.append(steps.max() / steps.mean())
    # cosine between the ramp's middle embedding and the chord midpoint of its ends
    mid = F.normalize(f[0] + f[-1], dim=-1)
    offarc.append(float((mid * f[3]).sum()))
print(f"{comp}: even {np.mean(even):.2f}, median max/mean {np.median(ratios):.2f}, cos(mid ramp, slerp mid) median {np.median(offarc):.3f} min {np.min(offarc):.3f}")

# geometry: cos(A, B), and how far each ramp point is from the A-B great circle (max cos over the arc)
ab, arc_fit = [], []
for scene in one_subject_scenes(20, 0, 32):
    obj = scene.objects[0]; b = other_colour(obj.colour)
    a_rgb, b_rgb = np.array(COLOURS[obj.colour], float), np.array(COLOURS[b], float)
    renders = [render_scene(scene.seed, 32, "heldout", recolour={0: tuple(float(round(v)) for v in (1 - t) * a_rgb + t * b_rgb)}).image for t in ts]
    f = F.normalize(clip_features(pipe, [Image.fromarray(r) for r in renders])[0], dim=-1)
    ab.append(float((f[0] * f[-1]).sum()))
    u = torch.linspace(0, 1, 101)[:, None]
    omega = torch.acos((f[0] * f[-1]).sum().clamp(-1, 1))
    arc = (torch.sin((1 - u) * omega) * f[0] + torch.sin(u * omega) * f[-1]) / torch.sin(omega)
    arc_fit.append([float((arc @ f[k]).max()) for k in range(1, 6)])
print(f"cos(A,B) median {np.median(ab):.3f}; ramp points' best cos to the A-B arc, median by frame 1..5: {np.median(arc_fit, 0).round(3).tolist()}")
