"""Decoder fine-tuning step throughput: our step vs the released script's way, same UNet, same run; memory of
full vs LoRA.

  reference  the released train_text_to_image_decoder.py's way (FACTS §3): batch 1 (its embedding indexing allows
             no more), every micro-batch re-encodes its image with the MoVQ and the CLIP image encoder, fp32,
             4 micro-batches accumulated per AdamW step
  ours       finetune-decoder's step: latents and embeddings cached once, (B, D) batches through the training
             core's DecoderObjective, bf16 autocast where the device supports it
  full/lora  the training state each mode carries: trainable parameters, their gradients and AdamW moments, and
             (cuda) the peak allocated memory of a step

    python benchmarks/decoder_finetune_step.py [--model models/miniworld] [--batch 16] [--device cuda] [--steps 5]

The last line is `speedup_vs_reference: X` (samples/s of ours over the reference's).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import timed  # noqa: E402

from lambda_eclipse.train.checkpoint import RunState  # noqa: E402
from lambda_eclipse.train.core import resolve_mixed_precision  # noqa: E402
from lambda_eclipse.train.decoder import DecoderObjective, DecoderObjectiveConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load(model: str, device: str):
    from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device)
    movq = VQModel.from_pretrained(model, subfolder="movq").to(device).eval().requires_grad_(False)
    encoder = CLIPVisionModelWithProjection.from_pretrained(model, subfolder="image_encoder").to(device).eval()
    processor = CLIPImageProcessorPil.from_pretrained(model, subfolder="image_processor")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    return unet, movq, encoder.requires_grad_(False), processor, scheduler


def add_lora(unet, rank: int = 8):
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]))
    return unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "src" / "lambda_eclipse" / "models" / "miniworld"),
                        help="folder with unet/, movq/, scheduler/, image_encoder/, image_processor/")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16, help="our micro-batch (the reference's is 1)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    unet, movq, encoder, processor, scheduler = load(args.model, device)
    size = int(unet.config.sample_size) * 2 ** (len(movq.config.block_out_channels) - 1)
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(64)]
    with torch.no_grad():  # the cache ours reads (what finetune-decoder computes once per run)
        pixels = torch.from_numpy(np.stack([np.asarray(p, np.float32) for p in pictures])).permute(0, 3, 1, 2)
        latents = movq.encode((pixels / 127.5 - 1).to(device)).latents
        embeds = encoder(pixel_values=processor(images=pictures, return_tensors="pt").pixel_values.to(device)).image_embeds
        zero = encoder(pixel_values=torch.zeros(1, 3, encoder.config.image_size, encoder.config.image_size,
                                                device=device)).image_embeds
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    precision = resolve_mixed_precision("auto") if device == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    print(f"device {device}, UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M params, {size}px, "
          f"ours: batch {args.batch}, {precision}")

    def objective(batch: int) -> DecoderObjective:
        return DecoderObjective(lambda: unet, scheduler, latents, embeds, zero,
                                DecoderObjectiveConfig(batch_size=batch, cond_dropout=0.1), ROOT / "unused")

    # ---- reference: batch 1, encoders rerun on every micro-batch, fp32, 4 accumulated micro-batches per step
    ref = objective(1)
    ref_state = RunState(generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    cursor = iter(range(10**9))

    def reference_step() -> None:
        for _ in range(4):
            picture = pictures[next(cursor) % len(pictures)]
            with torch.no_grad():
                pixel = torch.from_numpy(np.asarray(picture, np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
                latent = movq.encode(pixel.to(device)).latents
                embed = encoder(pixel_values=processor(images=[picture], return_tensors="pt").pixel_values.to(device)).image_embeds
            (ref.losses(unet, {"latents": latent, "embeds": embed}, ref_state)["loss"] / 4).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    unet.train()
    reference_s = timed(reference_step, args.steps, sync=sync)
    reference_rate = 4 / reference_s

    # ---- ours: cached (B, D) batches, mixed precision
    ours_obj = objective(args.batch)
    state = RunState(generator=torch.Generator().manual_seed(0))
    batches = ours_obj.batches(state, type("A", (), {"device": torch.device(device)})())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast():
        return torch.autocast(device.split(":")[0], dtype=dtype) if dtype else contextlib.nullcontext()

    def our_step() -> None:
        with autocast():
            loss = ours_obj.losses(unet, next(batches), state)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ours_s = timed(our_step, args.steps, sync=sync)
    ours_rate = args.batch / ours_s
    wanted, dtype = dtype, None  # the same step in fp32: what the cache and the batch alone buy
    fp32_rate = args.batch / timed(our_step, args.steps, sync=sync)
    dtype = wanted
    print(f"reference  {reference_rate:8.1f} samples/s  (batch 1 x 4 accumulated, encoders every step, fp32)")
    print(f"ours       {ours_rate:8.1f} samples/s  (batch {args.batch}, cached, {precision})")
    print(f"ours fp32  {fp32_rate:8.1f} samples/s  (batch {args.batch}, cached, fp32)")

    # ---- memory: full vs LoRA
    for mode in ("full", "lora"):
        model, *_ = load(args.model, device)
        if mode == "lora":
            add_lora(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        count = sum(p.numel() for p in trainable)
        state_bytes = sum(p.numel() * p.element_size() for p in trainable) * 3  # grads + 2 AdamW moments
        line = f"{mode:<5} trainable {count / 1e6:8.3f}M params, grads+AdamW state {state_bytes / 2**20:8.1f} MiB"
        if device.startswith("cuda"):
            opt = torch.optim.AdamW(trainable, lr=1e-5)
            obj = DecoderObjective(lambda: model, scheduler, latents, embeds, zero,
                                   DecoderObjectiveConfig(batch_size=args.batch), ROOT / "unused")
            st = RunState(generator=torch.Generator().manual_seed(0))
            it = obj.batches(st, type("A", (), {"device": torch.device(device)})())
            torch.cuda.reset_peak_memory_stats()
            for _ in range(2):
                with autocast():
                    obj.losses(model, next(it), st)["loss"].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            line += f", peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        print(line)
        del model
    print(f"speedup_vs_reference: {ours_rate / reference_rate:.2f}")


if __name__ == "__main__":
    main()
