"""The real architectures at their real size (FACTS.md §1) with random weights, or reduced for quick runs.

Speed and memory do not depend on the weights, so a pipeline folder built here from the Hub configs (CLIP
ViT-bigG/14 text and vision towers, the λ-ECLIPSE prior, the Kandinsky 2.2 UNet and MoVQ) measures what the
released stack costs. Sizes:

  full   the released configs: text 694.7 M, vision 1,844.9 M, prior 34.8 M, UNet 1,253.1 M, MoVQ 67.8 M params
  quick  the same wiring, every width and depth reduced (seconds per measurement on a CPU)
  tiny   hidden sizes of 8–64, for the fast test tier

    python benchmarks/fullsize.py --size full --dtype bfloat16 --out /tmp/lambda-eclipse-full
"""

from __future__ import annotations

import argparse
import gc
import string
from pathlib import Path

import torch

# Kandinsky 2.2 decoder (FACTS §1c), text and vision towers (§1b), prior (§1a).
K22_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012,
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
    "thresholding": False,
}
UNET_WIRING = dict(
    act_fn="silu", addition_embed_type="image", addition_embed_type_num_heads=64, center_input_sample=False,
    class_embed_type=None, conv_in_kernel=3, conv_out_kernel=3, cross_attention_norm=None,
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3, downsample_padding=1,
    dropout=0.0, dual_cross_attention=False, encoder_hid_dim_type="image_proj", flip_sin_to_cos=True, freq_shift=0,
    in_channels=4, mid_block_type="UNetMidBlock2DSimpleCrossAttn", mid_block_scale_factor=1, norm_eps=1e-5,
    only_cross_attention=False, out_channels=8, resnet_out_scale_factor=1.0, resnet_skip_time_act=False,
    resnet_time_scale_shift="scale_shift", time_embedding_type="positional",
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",), upcast_attention=False,
    use_linear_projection=False,
)
MOVQ_WIRING = dict(
    act_fn="silu", down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",), in_channels=3,
    latent_channels=4, norm_type="spatial", out_channels=3, scaling_factor=0.18215,
    up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3, vq_embed_dim=4,
)

SIZES = {
    "full": dict(
        dim=1280, image=512,
        text=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20),
        vision=dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                    patch_size=14, image_size=224),
        prior=dict(num_attention_heads=16, attention_head_dim=32, num_layers=10),
        unet=dict(block_out_channels=(384, 768, 1152, 1536), layers_per_block=3, attention_head_dim=64,
                  cross_attention_dim=768, norm_num_groups=32, sample_size=64),
        movq=dict(block_out_channels=(128, 256, 256, 512), layers_per_block=2, norm_num_groups=32,
                  num_vq_embeddings=16384, sample_size=32),
    ),
    "quick": dict(
        dim=256, image=256,
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                    patch_size=14, image_size=224),
        prior=dict(num_attention_heads=8, attention_head_dim=32, num_layers=4),
        unet=dict(block_out_channels=(64, 128, 192, 256), layers_per_block=1, attention_head_dim=32,
                  cross_attention_dim=256, norm_num_groups=32, sample_size=32),
        movq=dict(block_out_channels=(32, 64, 64, 128), layers_per_block=1, norm_num_groups=32,
                  num_vq_embeddings=1024, sample_size=32),
    ),
    "tiny": dict(
        dim=32, image=64,
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4),
        vision=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                    patch_size=8, image_size=32),
        prior=dict(num_attention_heads=2, attention_head_dim=8, num_layers=2),
        unet=dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, attention_head_dim=8,
                  cross_attention_dim=32, norm_num_groups=8, sample_size=8),
        movq=dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                  num_vq_embeddings=64, sample_size=32),
    ),
}
PROMPT_WORDS = ["a", "photo", "of", "dog", "cat", "wearing", "hat", "on", "the", "beach"]


def tokenizer():
    """A CLIP BPE tokenizer over single characters plus a few whole words, 77 positions; the text tower keeps its
    real 49,408-row embedding (token ids only index it, so the vocabulary does not change the cost)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(s, len(vocab))
        vocab.setdefault(s + "</w>", len(vocab))
    merges = []
    for word in PROMPT_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merges.append((current, piece))
            current += piece
            vocab.setdefault(current, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="<|endoftext|>")


def build_component(name: str, size: str = "full") -> torch.nn.Module:
    """One component at ``size`` with random weights, created in the current default dtype."""
    from diffusers import UNet2DConditionModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

    from lambda_eclipse import LambdaEclipsePrior

    s = SIZES[size]
    if name == "text_encoder":
        return CLIPTextModelWithProjection(CLIPTextConfig(
            **s["text"], vocab_size=49408, max_position_embeddings=77, projection_dim=s["dim"], hidden_act="gelu",
            bos_token_id=0, eos_token_id=1, pad_token_id=1))
    if name == "image_encoder":
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**s["vision"], projection_dim=s["dim"], hidden_act="gelu"))
    if name == "prior":
        return LambdaEclipsePrior(**s["prior"], embedding_dim=s["dim"])
    if name == "unet":
        return UNet2DConditionModel(**UNET_WIRING, **s["unet"], encoder_hid_dim=s["dim"])
    if name == "movq":
        return VQModel(**MOVQ_WIRING, **s["movq"])
    raise ValueError(name)


def image_processor(size: str = "full"):
    from transformers import CLIPImageProcessorPil

    side = SIZES[size]["vision"]["image_size"]
    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def build_pipeline_folder(out: str | Path, size: str = "full", dtype: torch.dtype = torch.bfloat16,
                          device: str = "cpu") -> Path:
    """Write a ``save_pretrained`` pipeline folder of random weights, one component in memory at a time (the
    full stack is 7.8 GB in bf16), initialised on ``device`` (a GPU draws 1.8 B random weights in a blink, a CPU
    core in minutes). Skipped when ``out`` already holds one of this size and dtype."""
    from diffusers import DDPMScheduler

    from lambda_eclipse import LambdaEclipsePipeline

    out = Path(out)
    stamp = out / "suite-build.txt"
    if stamp.is_file() and stamp.read_text() == f"{size} {dtype}":
        return out
    stamp.unlink(missing_ok=True)
    previous = torch.get_default_dtype()
    for name in ("text_encoder", "image_encoder", "prior", "unet", "movq"):
        torch.manual_seed(0)
        torch.set_default_dtype(dtype)  # created in dtype directly: no float32 copy of a 1.8 B tower
        try:
            with torch.device(device):
                module = build_component(name, size).eval()
        finally:
            torch.set_default_dtype(previous)
        module.save_pretrained(out / name)
        del module
        gc.collect()
    # The pipeline's own files (model_index.json, tokenizer, processor, scheduler) around the saved weights.
    shell = LambdaEclipsePipeline(
        prior=None, text_encoder=None, tokenizer=tokenizer(), image_encoder=None, image_processor=image_processor(size),
        unet=None, scheduler=DDPMScheduler.from_config(K22_SCHEDULER), movq=None)
    shell.tokenizer.save_pretrained(out / "tokenizer")
    shell.image_processor.save_pretrained(out / "image_processor")
    shell.scheduler.save_pretrained(out / "scheduler")
    index = {
        "_class_name": "LambdaEclipsePipeline", "_diffusers_version": __import__("diffusers").__version__,
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "image_processor": ["transformers", "CLIPImageProcessorPil"], "movq": ["diffusers", "VQModel"],
        "prior": ["lambda_eclipse.prior", "LambdaEclipsePrior"], "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    import json

    from lambda_eclipse.atomic import atomic_write

    atomic_write(out / "model_index.json", json.dumps(index, indent=2))
    atomic_write(stamp, f"{size} {dtype}")  # last: a folder without it is rebuilt
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="full", choices=list(SIZES))
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    print(build_pipeline_folder(args.out, args.size, getattr(torch, args.dtype)))


if __name__ == "__main__":
    main()
