"""The suite's measurements, one function each; run alone in a subprocess so that peak memory is per task.

    python benchmarks/suite_tasks.py TASK '{"kwarg": value, ...}'     # prints one line: SUITE_RESULT {json}

Every task returns a dict of figures and adds its process's peak RSS and, on CUDA, peak allocated VRAM.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import prior_inputs, timed  # noqa: E402
from fullsize import build_component  # noqa: E402

# Dense bf16/fp16 tensor-core peaks (vendor datasheets), for model FLOPs utilisation.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
PAPER_PRIOR_SAMPLES = 100_000 * 1024  # 100 K steps × 1,024 samples (paper appendix; 74 A100-hours)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def peak_memory(device: str) -> dict:
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.startswith("cuda"):
        out["peak_vram_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_vram_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return out


def peak_flops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ------------------------------------------------------------------------------------------------ generation
def generation(model: str, mode: str, device: str, dtype: str, images: int, steps: int, attention: str = "sdpa",
               compile_unet: bool = False, warmup: bool = False) -> dict:
    """Load ``model`` in memory ``mode`` and generate ``images`` at its native size; seconds per image, memory."""
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    from lambda_eclipse.cli import load_pipeline

    start = time.perf_counter()
    pipe = load_pipeline(model, device, dtype, mode)
    _sync(device)
    load_s = time.perf_counter() - start
    rss_loaded = current_rss()
    if attention == "classic":  # diffusers' pre-SDPA attention (explicit softmax(QKᵀ)V)
        pipe.unet.set_attn_processor(AttnAddedKVProcessor())
    if compile_unet:
        pipe.unet.compile()
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_images_per_prompt=images, num_inference_steps=steps, guidance_scale=7.5, scheduler="ddim",
                output_type="pil")
    if warmup:  # compilation, cuDNN autotuning, allocator growth
        pipe("a photo of a dog", **{**call, "num_inference_steps": 2, "num_images_per_prompt": 1})
    generator = [torch.Generator().manual_seed(i) for i in range(images)]
    _sync(device)
    start = time.perf_counter()
    out = pipe("a photo of a dog wearing a hat", generator=generator, **call)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"mode": mode, "images": images, "steps": steps, "attention": attention, "compile": compile_unet,
            "height": out.images[0].height, "load_s": load_s, "seconds": seconds, "seconds_per_image": seconds / images,
            "rss_after_load_bytes": rss_loaded, **peak_memory(device)}


# ------------------------------------------------------------------------------------------------ encoders
def encoders(model: str, device: str, dtype: str, batch: int, repeats: int = 2) -> dict:
    """The dataset builder's CLIP-feature stage (``dataset.features.encode_records``) at this model's size:
    records/s, each record an image, two subject crops and an edge map (4 vision + 1 text forward)."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

    from lambda_eclipse.dataset.features import CaptionedImage, ClipEncoders, encode_records

    kw = {"dtype": getattr(torch, dtype)}
    enc = ClipEncoders(
        CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
        CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder", **kw).to(device).eval(),
        CLIPVisionModelWithProjection.from_pretrained(model, subfolder="image_encoder", **kw).to(device).eval(),
        CLIPImageProcessorPil.from_pretrained(model, subfolder="image_processor"),
    )
    g = torch.Generator().manual_seed(0)

    def picture(side: int) -> Image.Image:
        return Image.fromarray(torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8).numpy())

    records = [CaptionedImage(picture(512), "a photo of a dog wearing a hat on the beach",
                              [("dog", picture(256)), ("hat", picture(256))], f"r{i}") for i in range(batch)]
    seconds = timed(lambda: encode_records(enc, records), repeats, sync=lambda: _sync(device))
    return {"batch": batch, "records_per_s": batch / seconds, **peak_memory(device)}


# ------------------------------------------------------------------------------------------------ prior
def prior_forward(size: str, device: str, dtype: str, batches: list[int], repeats: int = 3) -> dict:
    """Prior forward samples/s: ours (trimmed text, SDPA, packed tokens) vs the released code's way."""
    from released_prior import ReleasedPrior

    torch.manual_seed(0)
    ours = build_component("prior", size).to(device, getattr(torch, dtype)).eval()
    cfg = ours.config
    released = ReleasedPrior(cfg.num_attention_heads, cfg.attention_head_dim, cfg.num_layers, cfg.embedding_dim)
    released = released.to(device, getattr(torch, dtype)).eval()
    released.load_state_dict(ours.state_dict())
    rows = []
    for batch in batches:
        x = prior_inputs(batch, dim=cfg.embedding_dim, device=device)
        x = {k: (v.to(getattr(torch, dtype)) if v.is_floating_point() else v) for k, v in x.items()}
        with torch.inference_mode():
            ours_s = timed(lambda: ours(**x), repeats, sync=lambda: _sync(device))
            released_s = timed(lambda: released(**x), repeats, sync=lambda: _sync(device))
        rows.append({"batch": batch, "ours_samples_per_s": batch / ours_s, "released_samples_per_s": batch / released_s,
                     "speedup": released_s / ours_s})
    return {"rows": rows, **peak_memory(device)}


def prior_train(size: str, device: str, batch: int, steps: int = 3) -> dict:
    """Prior training step (Eq. 1, λ binding, AdamW) in bf16 autocast at ``batch``: samples/s, FLOPs per step
    (counted by torch's FlopCounterMode on one step), model FLOPs utilisation, and the projected device-hours of
    the paper's 100 K steps × 1,024 samples."""
    from prior_train_step import feature_batch
    from torch.utils.flop_counter import FlopCounterMode

    from lambda_eclipse.train.step import prior_step_losses

    torch.manual_seed(0)
    model = build_component("prior", size).to(device).train()
    dim = model.config.embedding_dim
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    zero = torch.randn(dim, device=device)
    generator = torch.Generator().manual_seed(0)
    x = feature_batch(batch, batch, device, dim)

    def step() -> None:
        with torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
            losses, _ = prior_step_losses(model, x, zero, generator, 0.2, 0.01, 0.01, 0.0)
        losses["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    seconds = timed(step, steps, warmup=0, sync=lambda: _sync(device))
    samples_per_s = batch / seconds
    peak = peak_flops(device)
    return {"batch": batch, "seconds_per_step": seconds, "samples_per_s": samples_per_s, "flops_per_step": flops,
            "achieved_tflops": flops / seconds / 1e12, "mfu": None if peak is None else flops / seconds / peak,
            "projected_device_hours_paper_run": PAPER_PRIOR_SAMPLES / samples_per_s / 3600,
            "longest_caption": int(x["token_states"].shape[1]), **peak_memory(device)}


# ------------------------------------------------------------------------------------------------ decoder
def unet_train(size: str, device: str, method: str, batch: int, steps: int = 3, lora_rank: int = 16) -> dict:
    """One decoder fine-tuning step (Eq. 2: ε-MSE on noised MoVQ latents, AdamW) at the UNet's native latent size,
    bf16 autocast. ``method`` "full": every weight trained (fp32 master weights); "lora": peft LoRA of
    ``lora_rank`` on the attention projections, the base frozen in bf16."""
    from diffusers import DDPMScheduler

    from fullsize import K22_SCHEDULER
    from lambda_eclipse.losses import decoder_loss, diffusion_target

    torch.manual_seed(0)
    unet = build_component("unet", size).to(device)
    if method == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(dtype=torch.bfloat16)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]))
        for p in unet.parameters():  # adapters train in fp32
            if p.requires_grad:
                p.data = p.data.float()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    scheduler = DDPMScheduler.from_config(K22_SCHEDULER)
    side, dim = unet.config.sample_size, unet.config.encoder_hid_dim
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, side, side, generator=g).to(device)
    cond = torch.randn(batch, dim, generator=g).to(device)

    def step() -> None:
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(latents.shape, generator=g).to(device)
        noisy = scheduler.add_noise(latents, noise, t.to(device))
        with torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
            pred = unet(noisy, t.to(device), None, added_cond_kwargs={"image_embeds": cond}).sample[:, :4]
        loss = decoder_loss(pred.float(), diffusion_target(scheduler, latents, noise, t.to(device)), t, scheduler)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = timed(step, steps, warmup=1, sync=lambda: _sync(device))
    return {"method": method, "batch": batch, "latent_side": side, "trainable_params": sum(p.numel() for p in trainable),
            "seconds_per_step": seconds, "samples_per_s": batch / seconds, **peak_memory(device)}


TASKS = {"generation": generation, "encoders": encoders, "prior_forward": prior_forward, "prior_train": prior_train,
         "unet_train": unet_train}


def main() -> None:
    task, kwargs = sys.argv[1], json.loads(sys.argv[2])
    threads = kwargs.pop("threads", None)
    if threads:
        torch.set_num_threads(threads)
    result = TASKS[task](**kwargs)
    print("SUITE_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
