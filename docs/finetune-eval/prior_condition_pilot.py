"""Pilot (issue 12): fine-tune the decoder on what inference feeds it, the prior's embedding of each training
scene, instead of (or besides) the scene's own CLIP embedding (Eq. 2).

Usage, after `lambda-eclipse miniworld finetune-eval --concepts hardest --work runs/finetune-eval-hardest ...`:
    python docs/finetune-eval/prior_condition_pilot.py VARIANT [STEPS]
VARIANT: prior (every image conditioned on the prior's embedding of its scene: appearance-free caption, every
subject word bound to its crop, one prior sample) or half (even-numbered images keep their CLIP embedding). The
run copies the hardest-concepts run's encoded cache with the embeddings replaced, fine-tunes full at the
finetune-eval settings, and scores the same three prompt sets as finetune-eval.
"""
import json, sys, time
from dataclasses import replace
from pathlib import Path
import numpy as np, torch
from PIL import Image
from safetensors.torch import load_file, save_file
from lambda_eclipse.pipeline import LambdaEclipsePipeline
from lambda_eclipse.miniworld import finetune_eval as fe
from lambda_eclipse.miniworld.evaluate import EvalConfig, clip_features, subject_embeddings
from lambda_eclipse.miniworld.oracle import load_oracle
from lambda_eclipse.miniworld.scenes import iter_scenes
from lambda_eclipse.train.core import run_training
from lambda_eclipse.train.finetune import load_finetune_config, loop_settings, prepare_finetune
from lambda_eclipse.cli import BUNDLED_MODEL, BUNDLED_ORACLE

torch.set_num_threads(2)
variant, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 400
base, work = Path("runs/finetune-eval-hardest"), Path(f"runs/prior-condition-{variant}")
cfg = replace(fe.FinetuneEvalConfig(), concepts="hardest", threads=2)
pipe = LambdaEclipsePipeline.from_pretrained(str(BUNDLED_MODEL)); pipe.set_progress_bar_config(disable=True)
oracle = load_oracle(str(BUNDLED_ORACLE)); size = 32
tuned, control = fe.hardest_instances(json.loads((base / "selection.json").read_text()), 8)
names = sorted("-".join(c) for c in tuned)
# the training scenes behind each concept image, in the order write_concepts_folder wrote them
scenes = {n: [] for n in names}
for scene in iter_scenes(cfg.train_stream, size, "heldout"):
    for c in set(fe._key(o) for o in scene.objects) & set(tuned):
        if len(scenes["-".join(c)]) < cfg.train_images:
            scenes["-".join(c)].append(scene)
    if all(len(v) == cfg.train_images for v in scenes.values()):
        break
ordered = [s for n in names for s in scenes[n]]
for n in names:  # the reconstruction is the folder's content
    assert np.array_equal(np.asarray(Image.open(base / "concepts" / n / "000.png")), scenes[n][0].image)
clock = time.monotonic()
crops = [clip_features(pipe, [Image.fromarray(o.crop) for o in s.objects])[0] for s in ordered]
prior = subject_embeddings(pipe, ordered, crops, EvalConfig(images_per_prompt=1, seed=11))
print(f"prior embeddings of {len(ordered)} training scenes in {time.monotonic() - clock:.0f} s", flush=True)
config = load_finetune_config(None, [
    f"data.concepts_dir={base / 'concepts'}", f"model.decoder={BUNDLED_MODEL}", f"model.encoders={BUNDLED_MODEL}",
    "mode=full", f"optim.lr={cfg.full_lr}", f"data.batch_size={cfg.batch_size}", f"loss.cond_dropout={cfg.cond_dropout}",
    f"loss.snr_gamma={cfg.snr_gamma}", "mixed_precision=no", "log_with=none", "progress=false"],
    output_dir=str(work / "full"), max_steps=steps, checkpoint_every=steps)
cache = next((base / "full" / "cache").glob("encoded-*.safetensors"))
(work / "full" / "cache").mkdir(parents=True, exist_ok=True)
encoded = load_file(str(cache))
embeds = encoded["embeds"].clone()
keep = torch.zeros(len(embeds), dtype=torch.bool)
if variant == "half":
    keep[::2] = True
embeds[~keep] = prior[~keep].to(embeds.dtype)
cos = torch.nn.functional.cosine_similarity(encoded["embeds"].float(), prior.float(), dim=-1)
print(f"{variant}: {int((~keep).sum())} of {len(embeds)} conditions replaced; cosine prior vs CLIP {cos.mean():.3f}", flush=True)
save_file({**encoded, "embeds": embeds.contiguous()}, str(work / "full" / "cache" / cache.name))
objective = prepare_finetune(config)
assert torch.equal(objective.embeds, embeds) if hasattr(objective, "embeds") else True
run = run_training(objective, loop_settings(config))
pipe.unet = run.model.eval()
sets = {"finetuned": fe.eval_prompts(tuned, control, cfg.prompts_per_concept, cfg.eval_stream, size),
        "control": fe.eval_prompts(control, tuned, cfg.prompts_per_concept, cfg.eval_stream, size)}
for name, prompts in sets.items():
    figures, _ = fe.score(pipe, oracle, prompts, fe.prompt_embeddings(pipe, prompts, cfg.images_per_prompt), cfg, size)
    print(variant, steps, name, json.dumps({k: round(v, 3) for k, v in figures.items()
                                            if k.startswith("shape_found") or k in ("clip_t", "background_colour")}), flush=True)
