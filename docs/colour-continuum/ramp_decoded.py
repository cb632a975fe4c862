"""Decoder check without a prior: decode the CLIP embeddings of N rendered RGB ramps (interpolation-eval's
measure_ramp) through COMPONENTS' UNet, optionally with a colour-stage checkpoint's EMA weights.
Usage: ramp_decoded.py COMPONENTS N [CHECKPOINT]"""
import sys, json, shutil, tempfile, torch
from dataclasses import replace
from pathlib import Path
torch.set_num_threads(int(__import__("os").environ.get("THREADS", "1")))
from lambda_eclipse.pipeline import LambdaEclipsePipeline
from lambda_eclipse.miniworld.bundle import assemble_bundle
from lambda_eclipse.miniworld.oracle import load_oracle
from lambda_eclipse.miniworld.interpolation_eval import InterpolationEvalConfig, measure_ramp
comp, n = Path(sys.argv[1]), int(sys.argv[2])
tmp = Path(tempfile.mkdtemp())
bundle = assemble_bundle(comp, Path("models/miniworld/prior"), tmp / "bundle")  # the prior is not used here
pipe = LambdaEclipsePipeline.from_pretrained(str(bundle)); pipe.set_progress_bar_config(disable=True)
if len(sys.argv) > 3:
    from safetensors.torch import load_file
    ema = load_file(sys.argv[3] + "/ema.safetensors")
    keys = sorted(ema, key=int)
    params = list(pipe.unet.parameters())
    assert len(keys) == len(params), (len(keys), len(params), list(ema)[:5])
    with torch.no_grad():
        for k, p in zip(keys, params):
            p.copy_(ema[k].to(p.dtype))
oracle = load_oracle("models/miniworld-oracle")
ramp = measure_ramp(pipe, oracle, replace(InterpolationEvalConfig(), num_lines=n), 32)
print(sys.argv[1:], json.dumps(ramp["decoded"]))
shutil.rmtree(tmp)
