"""Training-step throughput: our step vs the released code's way, same architecture, same batches.

  reference  ReleasedPrior (diffusers BasicTransformerBlock, all 81 tokens, −10000 float masks per head), fp32
  ours       lambda_eclipse's trainer step (prior_step_losses: λ binding, trimmed text, SDPA), bf16 autocast
             where the device supports it
Both: forward + Eq. 1 loss + backward + AdamW, paper config (10 layers, 16×32 heads, D=1280), caption lengths
drawn like BLIP-2 captions (mean ~16 tokens), 1–4 subjects bound. Last line: `speedup_vs_reference: X`
(at the largest batch).

    python benchmarks/prior_train_step.py [--batches 32 128] [--device cuda] [--steps N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import caption_lengths, timed  # noqa: E402
from released_prior import ReleasedPrior  # noqa: E402

from lambda_eclipse import LambdaEclipsePrior  # noqa: E402
from lambda_eclipse.losses import prior_loss  # noqa: E402
from lambda_eclipse.train.core import resolve_mixed_precision  # noqa: E402
from lambda_eclipse.train.step import interleaved_prior_inputs, prior_step_losses  # noqa: E402

DIM, TEXT = 1280, 77


def feature_batch(batch: int, seed: int, device: str, dim: int = DIM) -> dict[str, torch.Tensor]:
    """A collated feature batch as the trainer receives it: text padded to the longest caption only."""
    g = torch.Generator().manual_seed(seed)
    lengths = caption_lengths(batch, g)
    longest = int(lengths.max())
    subjects = torch.randint(1, 5, (batch,), generator=g)
    token_subject = torch.full((batch, longest), -1, dtype=torch.long)
    for i in range(batch):
        for s in range(int(subjects[i])):
            start = 1 + s * 2
            if start + 1 < lengths[i] - 1:
                token_subject[i, start] = s
    x = dict(
        token_states=torch.randn(batch, longest, dim, generator=g),
        attention_mask=torch.arange(longest)[None] < lengths[:, None],
        pooled_text=torch.randn(batch, dim, generator=g), target=torch.randn(batch, dim, generator=g),
        subject_embeds=torch.randn(batch, 4, dim, generator=g), token_subject=token_subject,
        subject_mask=torch.arange(4)[None] < subjects[:, None], edge=torch.randn(batch, dim, generator=g),
        has_edge=torch.rand(batch, generator=g) < 0.5,
    )
    return {k: v.to(device) for k, v in x.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median)")
    parser.add_argument("--precision", default="auto", choices=["auto", "no", "bf16"])
    args = parser.parse_args()
    device = args.device
    precision = resolve_mixed_precision(args.precision) if args.precision == "auto" else args.precision
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    print(f"device={device} ours_precision={precision} threads={torch.get_num_threads()} torch={torch.__version__}")
    torch.manual_seed(0)
    ours = LambdaEclipsePrior().to(device).train()
    reference = ReleasedPrior().to(device).train()
    reference.load_state_dict(ours.state_dict())
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-5)
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-5)
    zero = torch.randn(DIM, device=device)
    generator = torch.Generator().manual_seed(0)
    autocast_type = "cuda" if device.startswith("cuda") else "cpu"
    results = {}
    for batch in args.batches:
        x = feature_batch(batch, batch, device)

        def step_ours():
            with torch.autocast(autocast_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                losses, _ = prior_step_losses(ours, x, zero, generator, 0.2, 0.01, 0.01, 0.0)
            losses["loss"].backward()
            opt_ours.step()
            opt_ours.zero_grad(set_to_none=True)

        def step_reference():
            inputs = interleaved_prior_inputs(x, zero, generator, 0.01)
            pad = TEXT - inputs["encoder_hidden_states"].shape[1]
            states = torch.nn.functional.pad(inputs["encoder_hidden_states"], (0, 0, 0, pad))
            mask = torch.nn.functional.pad(inputs["attention_mask"], (0, pad))
            pred = reference(inputs["hidden_states"], inputs["proj_embedding"], states, mask, inputs["control_embedding"])
            prior_loss(pred, x["target"], x["pooled_text"], lambda_contrastive=0.2, temperature=0.01)["loss"].backward()
            opt_ref.step()
            opt_ref.zero_grad(set_to_none=True)

        seconds_ref = timed(step_reference, args.steps, sync=sync)
        seconds_ours = timed(step_ours, args.steps, sync=sync)
        longest = x["token_states"].shape[1]
        print(f"batch={batch:<4d} longest_caption={longest:<3d} reference_samples_per_s={batch / seconds_ref:8.1f} "
              f"ours_samples_per_s={batch / seconds_ours:8.1f} ratio={seconds_ref / seconds_ours:.2f}")
        results[batch] = seconds_ref / seconds_ours
    print(f"speedup_vs_reference: {results[max(results)]:.2f}")


if __name__ == "__main__":
    main()
