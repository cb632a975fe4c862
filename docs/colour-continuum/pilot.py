"""Pilot: 8 slerp lines + 8 decoded RGB ramps on a model folder."""
import sys, json, torch
from dataclasses import replace
torch.set_num_threads(1)
from lambda_eclipse.pipeline import LambdaEclipsePipeline
from lambda_eclipse.miniworld.oracle import load_oracle
from lambda_eclipse.miniworld.interpolation_eval import InterpolationEvalConfig, measure_lines, measure_ramp
model, n = sys.argv[1], int(sys.argv[2])
pipe = LambdaEclipsePipeline.from_pretrained(model); pipe.set_progress_bar_config(disable=True)
if len(sys.argv) > 3:  # an EMA checkpoint of the continuation
    from safetensors.torch import load_file
    ema = load_file(sys.argv[3] + "/ema.safetensors")
    with torch.no_grad():
        for i, p in enumerate(pipe.unet.parameters()):
            p.copy_(ema[str(i)].to(p.dtype))
from lambda_eclipse.cli import BUNDLED_ORACLE
oracle = load_oracle(str(BUNDLED_ORACLE))
cfg = replace(InterpolationEvalConfig(), num_lines=n)
m, f, r = measure_lines(pipe, oracle, cfg, 32, "slerp")
print(json.dumps(m))
ramp = measure_ramp(pipe, oracle, cfg, 32)
print(json.dumps(ramp["decoded"]))
