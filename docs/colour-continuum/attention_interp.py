"""Pilot (issue 13): attention interpolation (after DiffMorpher / AID). Each inner frame is decoded with its slerp
embedding as usual, but in every attention layer its keys and values are blended from the two ends' own decodes at
the same step ("inner": K, V = lerp(K_A, K_B); "outer": lerp of the two attention outputs), optionally only in the
first share of the steps, optionally with the frame's latents AdaIN-matched to the lerp of the ends' per-channel
statistics after every step. Usage: [MODEL=DIR THREADS=K] python docs/colour-continuum/attention_interp.py LINES
FRAMES MODE[,MODE...] where MODE is plain | inner | outer, with :UNTIL (share of steps) and/or +adain."""
import os, sys, torch, numpy as np, torch.nn.functional as F
from pathlib import Path
from PIL import Image
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from diffusers.utils.torch_utils import randn_tensor
from lambda_eclipse.pipeline import LambdaEclipsePipeline
from lambda_eclipse.decoding import decode_image_embeds, decoder_scheduler
from lambda_eclipse.miniworld.oracle import load_oracle
from lambda_eclipse.miniworld.interpolation_eval import InterpolationEvalConfig, one_subject_scenes, other_colour, subject_picture, score_line
from lambda_eclipse.interpolation import Corner
from lambda_eclipse.cli import BUNDLED_ORACLE

pipe = LambdaEclipsePipeline.from_pretrained(os.environ.get("MODEL", "models/miniworld")); pipe.set_progress_bar_config(disable=True)
oracle = load_oracle(str(BUNDLED_ORACLE)); cfg = InterpolationEvalConfig(); size = 32
n, nframes, modes = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")


class State:
    mode = "off"  # off | a | b | blend
    variant = "inner"
    until = 1.0
    steps = cfg.num_inference_steps
    t = None  # (N,) frame weights
    def reset(self): self.calls = {}


state, store = State(), {}


class BlendProcessor:
    """AttnAddedKVProcessor2_0 whose keys/values are recorded (ends) or blended from the recorded ends (frames)."""
    def __init__(self, name): self.name = name
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        residual = hidden_states
        h = hidden_states.view(hidden_states.shape[0], hidden_states.shape[1], -1).transpose(1, 2)
        bsz = h.shape[0]
        h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
        q = attn.head_to_batch_dim(attn.to_q(h), out_dim=4)
        k = torch.cat([attn.add_k_proj(encoder_hidden_states), attn.to_k(h)], 1)
        v = torch.cat([attn.add_v_proj(encoder_hidden_states), attn.to_v(h)], 1)
        idx = state.calls.get(self.name, 0); state.calls[self.name] = idx + 1
        if state.mode in ("a", "b"):
            store[(state.mode, self.name, idx)] = (k, v)
        blend = state.mode == "blend" and idx < state.until * state.steps
        split = lambda x: attn.head_to_batch_dim(x, out_dim=4)
        if blend:
            nf = bsz // 2
            rows = [0] * nf + [1] * nf  # CFG batch: uncond half, then cond half
            t = torch.cat([state.t, state.t]).to(k.dtype)[:, None, None]
            ka, va = (x[rows] for x in store[("a", self.name, idx)])
            kb, vb = (x[rows] for x in store[("b", self.name, idx)])
            if state.variant == "inner":
                o = F.scaled_dot_product_attention(q, split((1 - t) * ka + t * kb), split((1 - t) * va + t * vb))
            else:
                t4 = t[:, :, :, None]
                o = (1 - t4) * F.scaled_dot_product_attention(q, split(ka), split(va)) + t4 * F.scaled_dot_product_attention(q, split(kb), split(vb))
        else:
            o = F.scaled_dot_product_attention(q, split(k), split(v))
        o = o.transpose(1, 2).reshape(bsz, -1, residual.shape[1])
        o = attn.to_out[1](attn.to_out[0](o))
        return o.transpose(-1, -2).reshape(residual.shape) + residual


pipe.unet.set_attn_processor({name: BlendProcessor(name) for name in pipe.unet.attn_processors})
latent_store = {}


def adain_callback(p, i, timestep, kw):
    lat = kw["latents"]
    if state.mode in ("a", "b"):
        latent_store[(state.mode, i)] = lat.clone()
    elif state.mode == "blend" and state.adain:
        a, b = latent_store[("a", i)], latent_store[("b", i)]
        t = state.t.to(lat.dtype)[:, None, None, None]
        mu = (1 - t) * a.mean((2, 3), keepdim=True) + t * b.mean((2, 3), keepdim=True)
        sd = (1 - t) * a.std((2, 3), keepdim=True) + t * b.std((2, 3), keepdim=True)
        lat = (lat - lat.mean((2, 3), keepdim=True)) / lat.std((2, 3), keepdim=True) * sd + mu
    return {"latents": lat}


def decode(embeds, gens):
    state.reset()
    from lambda_eclipse.encoders import zero_image_embedding
    neg = zero_image_embedding(pipe.image_encoder).to(embeds.dtype).expand(len(embeds), -1)
    h, w = pipe._default_size(None, None)
    out = decode_image_embeds(pipe.unet, decoder_scheduler(pipe.scheduler, cfg.scheduler), pipe.movq, embeds, neg, h, w,
                              cfg.num_inference_steps, cfg.guidance_scale, gens, "np", adain_callback)
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


def line(corners, mode):
    variant, _, rest = mode.partition(":") if ":" in mode else (mode.split("+")[0], "", "")
    state.variant = variant.split("+")[0]
    state.until = float(rest.split("+")[0]) if rest else 1.0
    state.adain = mode.endswith("+adain")
    ts = np.linspace(0, 1, nframes)
    out = pipe.interpolate(corners, steps=2, path="slerp", seed=cfg.seed, positions=[(0.0, float(t)) for t in ts], output_type="embeds")
    dim = pipe.embedding_dim
    def gen():
        g = torch.Generator("cpu").manual_seed(cfg.seed); randn_tensor((1, dim), generator=g, dtype=pipe.prior.dtype); return g
    state.mode = "a"; fa = decode(out.image_embeds[:1], [gen()])
    state.mode = "b"; fb = decode(out.image_embeds[-1:], [gen()])
    state.mode = "off" if state.variant == "plain" else "blend"
    state.t = torch.tensor(ts[1:-1], dtype=torch.float32)
    fm = decode(out.image_embeds[1:-1], [gen() for _ in ts[1:-1]])
    return np.concatenate([fa, fm, fb])


outdir = Path("runs/colour-continuum"); outdir.mkdir(parents=True, exist_ok=True)
rows, allframes = {}, {m: [] for m in modes}
for scene in one_subject_scenes(n, cfg.seed, size):
    obj = scene.objects[0]; b = other_colour(obj.colour); prompt = scene.captions["appearance_free"]
    corners = [Corner(prompt, {obj.noun: Image.fromarray(obj.crop)}), Corner(prompt, {obj.noun: subject_picture(obj.shape, b, obj.texture, size)})]
    for m in modes:
        fr = line(corners, m)
        r = score_line(pipe, oracle, fr, obj, b); rows.setdefault(m, []).append(r); allframes[m].append(fr)
        print(obj.shape, obj.colour, b, m.ljust(12), "found", r["found_every_frame"], "reading_b", [round(v, 2) for v in r["reading_b"]],
              "steps", [round(v, 3) for v in r["clip_i_steps"]], "max/mean", round(r["max_over_mean_step"], 2), flush=True)
for m, r in rows.items():
    print(m, "found", np.mean([x["found_every_frame"] for x in r]), "<=1 turn", np.mean([x["direction_changes"] <= 1 for x in r]),
          "even", np.mean([x["even"] for x in r]), "median max/mean", np.median([x["max_over_mean_step"] for x in r]),
          "all three", np.mean([x["found_every_frame"] and x["direction_changes"] <= 1 and x["even"] for x in r]), flush=True)
    grid = np.concatenate([np.concatenate(list(f), 1) for f in allframes[m]], 0)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(outdir / f"attn-{m.replace(':', '_')}.png")
