"""CLIP-only check of a components folder on the 20 interpolation-eval scenes rendered along their A -> B RGB ramp
(7 frames): CLIP-I evenness of neighbour steps, how close slerp(emb(A), emb(B), t) lies to emb(ramp at t), and
where along the ramp the steps are largest. Usage: python docs/colour-continuum/clip_ramp.py COMPONENTS"""
import sys
from types import SimpleNamespace
import numpy as np, torch, torch.nn.functional as F
from PIL import Image
from transformers import CLIPVisionModelWithProjection, CLIPImageProcessorPil
from lambda_eclipse.miniworld.interpolation_eval import one_subject_scenes, other_colour, ramp_renders
from lambda_eclipse.miniworld.evaluate import clip_features

comp = sys.argv[1]
pipe = SimpleNamespace(image_encoder=CLIPVisionModelWithProjection.from_pretrained(f"{comp}/image_encoder").eval(),
                       image_processor=CLIPImageProcessorPil.from_pretrained(f"{comp}/image_processor"))
even, ratios, offarc, ab, arc_fit, prof = [], [], [], [], [], []
for scene in one_subject_scenes(20, 0, 32):
    renders = ramp_renders(scene, other_colour(scene.objects[0].colour), 7, 32)
    f = F.normalize(clip_features(pipe, [Image.fromarray(r) for r in renders])[0], dim=-1)
    steps = (1 - (f[:-1] * f[1:]).sum(-1)).numpy()
    even.append(steps.max() <= 2 * steps.mean()); ratios.append(steps.max() / steps.mean()); prof.append(steps / steps.mean())
    offarc.append(float((F.normalize(f[0] + f[-1], dim=-1) * f[3]).sum()))  # ramp middle vs the chord's midpoint
    # how far each ramp point is from the A-B great circle (best cosine over the arc)
    ab.append(float((f[0] * f[-1]).sum()))
    u = torch.linspace(0, 1, 101)[:, None]
    omega = torch.acos((f[0] * f[-1]).sum().clamp(-1, 1))
    arc = (torch.sin((1 - u) * omega) * f[0] + torch.sin(u * omega) * f[-1]) / torch.sin(omega)
    arc_fit.append([float((arc @ f[k]).max()) for k in range(1, 6)])
print(f"{comp}: even {np.mean(even):.2f}, median max/mean {np.median(ratios):.2f}, cos(mid ramp, slerp mid) median {np.median(offarc):.3f} min {np.min(offarc):.3f}")
print(f"cos(A,B) median {np.median(ab):.3f}; ramp points' best cos to the A-B arc, median by frame 1..5: {np.median(arc_fit, 0).round(3).tolist()}")
print(comp, "step/mean by position, median:", np.median(prof, 0).round(2).tolist(), "argmax counts:", np.bincount(np.argmax(prof, 1), minlength=6).tolist())
