"""Which conditioning path of the decoder UNet makes the A->B flip: the added K/V tokens or the time embedding?"""
import sys, torch, numpy as np
from PIL import Image
torch.set_num_threads(1)
from lambda_eclipse.pipeline import LambdaEclipsePipeline
from lambda_eclipse.miniworld.oracle import load_oracle
from lambda_eclipse.miniworld.interpolation_eval import InterpolationEvalConfig, one_subject_scenes, other_colour, subject_picture, score_line
from lambda_eclipse.interpolation import Corner
from lambda_eclipse.cli import BUNDLED_ORACLE
pipe = LambdaEclipsePipeline.from_pretrained("models/miniworld"); pipe.set_progress_bar_config(disable=True)
oracle = load_oracle(str(BUNDLED_ORACLE)); cfg = InterpolationEvalConfig(); size = 32
class Fix(torch.nn.Module):
    def __init__(self, inner, fixed):
        super().__init__(); self.inner, self.fixed = inner, fixed
    def forward(self, x, *a, **k):
        x = x.clone(); b = x.shape[0] // 2; x[b:] = self.fixed.to(x.dtype).expand(b, -1); return self.inner(x, *a, **k)
n = int(sys.argv[1]); frames = 9; ts = np.linspace(0, 1, frames)
def run(corners):
    out = pipe.interpolate(corners, steps=frames, path="slerp", seed=cfg.seed, num_inference_steps=cfg.num_inference_steps,
                           guidance_scale=cfg.guidance_scale, scheduler=cfg.scheduler, output_type="np")
    return np.round(np.clip(out.images, 0, 1) * 255).astype(np.uint8)
rows = {}
for scene in one_subject_scenes(n, cfg.seed, size):
    obj = scene.objects[0]; b = other_colour(obj.colour); prompt = scene.captions["appearance_free"]
    corners = [Corner(prompt, {obj.noun: Image.fromarray(obj.crop)}), Corner(prompt, {obj.noun: subject_picture(obj.shape, b, obj.texture, size)})]
    ends = pipe.interpolate(corners, steps=2, seed=cfg.seed, output_type="embeds").corner_embeds
    res = {"both": score_line(pipe, oracle, run(corners), obj, b)}
    unet = pipe.unet; hid, add = unet.encoder_hid_proj, unet.add_embedding
    unet.add_embedding = Fix(add, ends[0]); res["tokens only"] = score_line(pipe, oracle, run(corners), obj, b); unet.add_embedding = add
    unet.encoder_hid_proj = Fix(hid, ends[0]); res["time-embedding only"] = score_line(pipe, oracle, run(corners), obj, b); unet.encoder_hid_proj = hid
    for k, r in res.items():
        rows.setdefault(k, []).append(r)
        print(obj.shape, obj.colour, b, k.ljust(20), "reading_b", r["reading_b"], "max/mean", round(r["max_over_mean_step"], 2), flush=True)
for k, r in rows.items():
    print(k, "even", np.mean([x["even"] for x in r]), "median max/mean", np.median([x["max_over_mean_step"] for x in r]),
          "reading_b at end", np.mean([x["reading_b"][-1] for x in r]).round(2))
