"""Where along the rendered ramps the CLIP-I steps are largest: median step by position, for a components folder."""
import sys
from types import SimpleNamespace
import numpy as np, torch.nn.functional as F
from PIL import Image
from transformers import CLIPVisionModelWithProjection, CLIPImageProcessorPil
from lambda_eclipse.miniworld.interpolation_eval import one_subject_scenes, other_colour
from lambda_eclipse.miniworld.evaluate import clip_features
from lambda_eclipse.miniworld.scenes import render_scene
from lambda_eclipse.miniworld.vocab import COLOURS
comp = sys.argv[1]
pipe = SimpleNamespace(image_encoder=CLIPVisionModelWithProjection.from_pretrained(f"{comp}/image_encoder").eval(),
                       image_processor=CLIPImageProcessorPil.from_pretrained(f"{comp}/image_processor"))
prof = []
for scene in one_subject_scenes(20, 0, 32):
    obj = scene.objects[0]; b = other_colour(obj.colour)
    a_rgb, b_rgb = np.array(COLOURS[obj.colour], float), np.array(COLOURS[b], float)
    r = [render_scene(scene.seed, 32, "heldout", recolour={0: tuple(float(round(v)) for v in (1 - t) * a_rgb + t * b_rgb)}).image for t in np.linspace(0, 1, 7)]
    f = F.normalize(clip_features(pipe, [Image.fromarray(x) for x in r])[0], dim=-1)
    s = (1 - (f[:-1] * f[1:]).sum(-1)).numpy(); prof.append(s / s.mean())
print(comp, "step/mean by position, median:", np.median(prof, 0).round(2).tolist(), "argmax counts:", np.bincount(np.argmax(prof, 1), minlength=6).tolist())
