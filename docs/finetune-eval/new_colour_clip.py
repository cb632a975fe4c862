"""Does the bundle's tiny CLIP tell a colour it never trained on from its neighbours? (issue 12)

Usage: python docs/finetune-eval/new_colour_clip.py. Each of the 8 shapes × 4 textures is drawn as a subject picture
in red, black and maroon (120, 20, 30) and in the other palette colours; the pictures are encoded with the bundle's
CLIP image encoder (the decoder's condition). Printed: mean cosine between the same shape and texture in two
colours, and how often a maroon picture's nearest other picture (same shape and texture) is red or black. A new
colour the CLIP cannot tell apart from red or black gives the decoder nothing to learn it from.
"""
import numpy as np, torch, torch.nn.functional as F
from lambda_eclipse.pipeline import LambdaEclipsePipeline
from lambda_eclipse.encoders import encode_images
from lambda_eclipse.miniworld.interpolation_eval import subject_picture, oracle_shapes
from lambda_eclipse.miniworld.vocab import COLOURS

torch.set_num_threads(2)
pipe = LambdaEclipsePipeline.from_pretrained("models/miniworld")
MAROON = (120.0, 20.0, 30.0)
colours = {**{k: k for k in COLOURS}, "maroon": MAROON}
textures = ["plain", "striped", "dotted", "checkered"]
feats = {}
with torch.no_grad():
    for shape in oracle_shapes():
        for texture in textures:
            pics = [subject_picture(shape, c, texture, 32) for c in colours.values()]
            for name, f in zip(colours, F.normalize(encode_images(pipe.image_processor, pipe.image_encoder, pics), dim=-1)):
                feats[(shape, texture, name)] = f
keys = [(s, t) for s in oracle_shapes() for t in textures]
def cos(a, b): return float(np.mean([float(feats[(s, t, a)] @ feats[(s, t, b)]) for s, t in keys]))
print("mean cosine, same shape and texture, two colours:")
for a, b in [("maroon", "red"), ("maroon", "black"), ("red", "black"), ("red", "pink"), ("red", "orange"), ("blue", "purple")]:
    print(f"  {a:>6} vs {b:<6} {cos(a, b):.3f}")
nearest = {}
for s, t in keys:
    others = [c for c in colours if c != "maroon"]
    sims = [float(feats[(s, t, "maroon")] @ feats[(s, t, c)]) for c in others]
    nearest[others[int(np.argmax(sims))]] = nearest.get(others[int(np.argmax(sims))], 0) + 1
print("maroon picture's nearest palette colour (32 shape × texture pairs):", nearest)
palette = [c for c in colours if c != "maroon"]
within = np.mean([min(float(feats[(s, t, a)] @ feats[(s, t, b)]) for a in palette for b in palette if a < b) for s, t in keys])
print(f"for scale: the least similar palette pair per shape × texture, mean cosine {within:.3f}")
