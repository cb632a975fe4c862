"""Blending at the decoder instead of the embedding: (a) the image-time-embedding outputs, (b) the UNet's predictions."""
import sys, torch, numpy as np
from pathlib import Path
from PIL import Image
torch.set_num_threads(1)
from lambda_eclipse.pipeline import LambdaEclipsePipeline
from lambda_eclipse.miniworld.oracle import load_oracle
from lambda_eclipse.miniworld.interpolation_eval import InterpolationEvalConfig, one_subject_scenes, other_colour, subject_picture, score_line
from lambda_eclipse.interpolation import Corner
from lambda_eclipse.cli import BUNDLED_ORACLE
pipe = LambdaEclipsePipeline.from_pretrained("models/miniworld"); pipe.set_progress_bar_config(disable=True)
oracle = load_oracle(str(BUNDLED_ORACLE)); cfg = InterpolationEvalConfig(); size = 32
n, frames = int(sys.argv[1]), int(sys.argv[2]); ts = np.linspace(0, 1, frames)
modes = sys.argv[3].split(",")
class AddBlend(torch.nn.Module):
    def __init__(self, inner): super().__init__(); self.inner = inner
    def forward(self, x):
        out = self.inner(x); b = x.shape[0] // 2
        a_, b_ = self.inner(self.ends.to(x.dtype))
        out = out.clone(); out[b:] = ((1 - self.t) * a_ + self.t * b_).expand(b, -1); return out
class UNetBlend(torch.nn.Module):
    def __init__(self, inner): super().__init__(); self.inner = inner; self.config = inner.config; self.dtype = inner.dtype; self.device = inner.device
    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=False, **k):
        emb = added_cond_kwargs["image_embeds"]; b = emb.shape[0] // 2
        outs = []
        for e in self.ends:
            x = emb.clone(); x[b:] = e.to(x.dtype).expand(b, -1)
            outs.append(self.inner(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs={"image_embeds": x}, return_dict=False)[0])
        out = outs[0].clone(); out[b:] = (1 - self.t) * outs[0][b:] + self.t * outs[1][b:]; out[:b] = outs[0][:b]
        return (out,)
def line(corners, hook):
    imgs = []
    for t in ts:
        hook.t = float(t)
        out = pipe.interpolate(corners, steps=frames, path="slerp", seed=cfg.seed, positions=[(0.0, float(t))], num_inference_steps=cfg.num_inference_steps,
                               guidance_scale=cfg.guidance_scale, scheduler=cfg.scheduler, output_type="np")
        imgs.append(np.round(np.clip(out.images[0], 0, 1) * 255).astype(np.uint8))
    return np.stack(imgs)
out = Path("runs/colour-continuum"); out.mkdir(parents=True, exist_ok=True)  # frame grids
rows = {}; allframes = {m: [] for m in modes}
for scene in one_subject_scenes(n, cfg.seed, size):
    obj = scene.objects[0]; b = other_colour(obj.colour); prompt = scene.captions["appearance_free"]
    corners = [Corner(prompt, {obj.noun: Image.fromarray(obj.crop)}), Corner(prompt, {obj.noun: subject_picture(obj.shape, b, obj.texture, size)})]
    ends = pipe.interpolate(corners, steps=2, seed=cfg.seed, output_type="embeds").corner_embeds
    unet = pipe.unet
    for m in modes:
        if m == "add":
            hook = AddBlend(unet.add_embedding); hook.ends = ends; unet.add_embedding = hook
            fr = line(corners, hook); unet.add_embedding = hook.inner
        else:
            hook = UNetBlend(unet); hook.ends = ends; pipe.unet = hook
            fr = line(corners, hook); pipe.unet = unet
        r = score_line(pipe, oracle, fr, obj, b); rows.setdefault(m, []).append(r); allframes[m].append(fr)
        print(obj.shape, obj.colour, b, m.ljust(5), "found", r["found_every_frame"], "reading_b", [round(v, 2) for v in r["reading_b"]], "max/mean", round(r["max_over_mean_step"], 2), flush=True)
for m, r in rows.items():
    print(m, "found", np.mean([x["found_every_frame"] for x in r]), "<=1 turn", np.mean([x["direction_changes"] <= 1 for x in r]),
          "even", np.mean([x["even"] for x in r]), "median max/mean", np.median([x["max_over_mean_step"] for x in r]), flush=True)
    grid = np.concatenate([np.concatenate(list(f), 1) for f in allframes[m]], 0)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(out / f"blend-{m}.png")
