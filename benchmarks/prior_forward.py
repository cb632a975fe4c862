"""Prior forward latency and throughput, paper config (10 layers, 16×32 heads, D=1280), batch 1 and 64.

Compares, in one run and on the same inputs (caption lengths drawn like BLIP-2 captions, mean ~16 tokens):
  released  the authors' way: diffusers BasicTransformerBlock, all 81 tokens, −10000 float masks per head
  full      LambdaEclipsePrior with trim=False (81 tokens, SDPA, one boolean mask for all heads)
  trimmed   LambdaEclipsePrior, text trimmed to the longest real caption in the batch (the default)
Prints each figure, then the ratios; the last line is `speedup_trimmed_vs_full: X`.

    python benchmarks/prior_forward.py [--device cuda] [--dtype bfloat16] [--repeats N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import prior_inputs, timed  # noqa: E402
from released_prior import ReleasedPrior  # noqa: E402

from lambda_eclipse import LambdaEclipsePrior  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    torch.manual_seed(0)
    ours = LambdaEclipsePrior().to(args.device, dtype).eval()
    released = ReleasedPrior().to(args.device, dtype).eval()
    released.load_state_dict(ours.state_dict())
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__}")
    ratios = {}
    for batch in args.batches:
        x = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in prior_inputs(batch, device=args.device).items()}
        longest = int(x["attention_mask"].sum(1).max())
        with torch.inference_mode():
            runs = {
                "released": lambda: released(**x),
                "full": lambda: ours(**x, trim=False),
                "trimmed": lambda: ours(**x),
            }
            seconds = {name: timed(fn, args.repeats, sync=sync) for name, fn in runs.items()}
            diff = (ours(**x).predicted_image_embedding.float() - released(**x).float()).abs().max().item()
        for name, s in seconds.items():
            print(f"batch={batch:<3d} {name:<8s} latency_ms={s * 1e3:9.2f} samples_per_s={batch / s:9.1f}")
        print(f"batch={batch:<3d} longest_caption_tokens={longest} max_abs_diff_vs_released={diff:.2e}")
        ratios[batch] = (seconds["full"] / seconds["trimmed"], seconds["released"] / seconds["trimmed"])
    for batch, (vs_full, vs_released) in ratios.items():
        print(f"batch={batch:<3d} speedup_trimmed_vs_full={vs_full:.2f} speedup_trimmed_vs_released={vs_released:.2f}")
    print(f"speedup_trimmed_vs_full: {ratios[max(ratios)][0]:.2f}")


if __name__ == "__main__":
    main()
