"""Tiny components built in-process from configs (hidden sizes 8–64, 1–2 layers); nothing touches the network."""

from __future__ import annotations

import string

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from lambda_eclipse import LambdaEclipsePipeline, LambdaEclipsePrior

DIM = 32
# Kandinsky 2.2's decoder scheduler (FACTS §1c).
K22_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012,
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
    "thresholding": False,
}
WHOLE_WORDS = ["a", "dog", "cat", "on", "the", "beach", "wearing", "hat", "and", "guinea", "pig", "photo", "of"]


def tiny_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single characters plus a few whole words (others split into characters)."""
    symbols = list(string.ascii_lowercase) + list(string.digits) + list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
        vocab.setdefault(s + "</w>", len(vocab))
    merges = []
    for word in WHOLE_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merges.append((current, piece))
            current = current + piece
            vocab.setdefault(current, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, pad_token="<|endoftext|>")


def tiny_pipeline(seed: int = 0, additional_embeddings: int = 4) -> LambdaEclipsePipeline:
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=DIM, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=DIM,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    ).eval()
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, projection_dim=DIM,
        )
    ).eval()
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    prior = LambdaEclipsePrior(
        num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=DIM, num_embeddings=77,
        additional_embeddings=additional_embeddings,
    )
    randomize(prior)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=8, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", addition_embed_type="image",
        encoder_hid_dim=DIM, encoder_hid_dim_type="image_proj", cross_attention_dim=DIM, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift", class_embed_type=None, norm_num_groups=8,
    ).eval()
    movq = VQModel(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), in_channels=3, out_channels=3,
        latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial", num_vq_embeddings=12,
        vq_embed_dim=4,
    ).eval()
    scheduler = DDPMScheduler.from_config(K22_SCHEDULER)
    return LambdaEclipsePipeline(
        prior=prior.eval(), text_encoder=text_encoder, tokenizer=tokenizer, image_encoder=image_encoder,
        image_processor=processor, unet=unet, scheduler=scheduler, movq=movq,
    )


def randomize(module: torch.nn.Module, std: float = 0.2) -> None:
    """Give every parameter (zero-initialised embeddings included) random values so tests see real math."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
