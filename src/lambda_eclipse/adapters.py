"""Personalized decoders: a fine-tuned UNet folder or a LoRA adapter file applied to a loaded pipeline.

``lambda-eclipse finetune-decoder`` writes either a full ``unet/`` folder or one small ``lora.safetensors`` (the
peft adapter weights, the ``LoraConfig`` as diffusers writes it, and the shape of the UNet it was trained on). This
module reads both; :meth:`LambdaEclipsePipeline.load_lora`, ``generate --unet/--lora``, the evaluation and the
demo all go through :func:`apply_decoder_adapters`, so a personalized decoder is used the same way everywhere.

LoRA loading is diffusers' own PEFT integration on the UNet (``load_lora_adapter`` / ``set_adapters`` /
``unload_lora``); peft is imported only when a LoRA is used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path
from .errors import UserError

ADAPTER_NAME = "personalized"
SIGNATURE_KEY = "lambda_eclipse_unet"  # safetensors metadata: the UNet shape the LoRA was trained on
CONFIG_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY: the LoraConfig as a dict
# What makes two UNets interchangeable for an adapter: every layer a LoRA can target has the same shape.
SIGNATURE_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
                    "encoder_hid_dim", "attention_head_dim", "down_block_types", "up_block_types", "mid_block_type")


def unet_signature(unet) -> dict[str, Any]:
    """The shape-defining part of a UNet's config, as plain JSON values."""
    return json.loads(json.dumps({k: unet.config.get(k) for k in SIGNATURE_FIELDS}))


def save_lora(unet, path: str | os.PathLike, adapter_name: str = ADAPTER_NAME) -> Path:
    """Write ``unet``'s LoRA adapter ``adapter_name`` to one safetensors file (atomically), with its config and the
    UNet's signature in the metadata."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = unet.peft_config[adapter_name].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    state = {k: v.detach().float().cpu().contiguous() for k, v in
             get_peft_model_state_dict(unet, adapter_name=adapter_name).items()}
    metadata = {"format": "pt", CONFIG_KEY: json.dumps(config, sort_keys=True, default=str),
                SIGNATURE_KEY: json.dumps(unet_signature(unet), sort_keys=True)}
    with atomic_path(path) as temporary:
        save_file(state, str(temporary), metadata=metadata)
    return Path(path)


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(state dict, LoraConfig dict, UNet signature) of a file written by :func:`save_lora`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file {str(path)!r} does not exist; give the lora.safetensors that finetune-decoder wrote")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        state = load_file(str(path))
        config, signature = json.loads(metadata[CONFIG_KEY]), json.loads(metadata[SIGNATURE_KEY])
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        reason = f"no {error} entry" if isinstance(error, KeyError) else str(error).splitlines()[0]
        raise UserError(f"{str(path)!r} is not a LoRA written by finetune-decoder ({reason}); give its lora.safetensors") from None
    return state, config, signature


def load_lora(unet, path: str | os.PathLike, scale: float = 1.0, adapter_name: str = ADAPTER_NAME) -> None:
    """Add the LoRA in ``path`` to ``unet`` (replacing an adapter of the same name) at strength ``scale``.

    Raises:
        UserError: an unreadable file, or a LoRA trained on a UNet of another shape.
    """
    state, config, signature = read_lora(path)
    if signature != unet_signature(unet):
        differs = next(k for k in SIGNATURE_FIELDS if signature.get(k) != unet_signature(unet).get(k))
        raise UserError(f"LoRA {str(path)!r} was trained on another UNet ({differs} {signature.get(differs)} here "
                        f"{unet.config.get(differs)}); use it with the decoder it was fine-tuned from")
    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        unet.delete_adapters(adapter_name)
    state = {k: v.to(unet.device, unet.dtype) for k, v in state.items()}
    unet.load_lora_adapter(state, prefix=None, adapter_name=adapter_name, metadata=config)
    unet.set_adapters([adapter_name], weights=[float(scale)])


def unload_lora(unet) -> None:
    """Remove every LoRA layer from ``unet`` (no-op without one): the UNet computes what it did before loading."""
    if getattr(unet, "peft_config", None):
        unet.unload_lora()


def load_unet(path: str | os.PathLike, like=None):
    """A fine-tuned UNet from ``path``: a ``unet/`` folder, or a folder holding one (a finetune-decoder run, a
    pipeline). With ``like`` (the UNet it replaces), refuse one of another shape; it takes ``like``'s device and dtype.
    """
    from diffusers import UNet2DConditionModel

    path = Path(path)
    if (path / "unet" / "config.json").is_file():
        path = path / "unet"
    if not (path / "config.json").is_file():
        raise UserError(f"{str(path)!r} holds no UNet (config.json); give the unet/ folder finetune-decoder wrote")
    try:
        unet = UNet2DConditionModel.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"cannot load the UNet in {str(path)!r} ({str(error).splitlines()[0]}); re-export it") from None
    if like is not None:
        mine, theirs = unet_signature(unet), unet_signature(like)
        if mine != theirs:
            differs = next(k for k in SIGNATURE_FIELDS if mine.get(k) != theirs.get(k))
            raise UserError(f"the UNet in {str(path)!r} has another shape than this model's decoder ({differs}: "
                            f"{mine.get(differs)} vs {theirs.get(differs)}); give a UNet fine-tuned from it")
        unet = unet.to(like.device, like.dtype)
    return unet.eval()


def apply_decoder_adapters(pipe, unet: str | os.PathLike | None = None, lora: str | os.PathLike | None = None,
                           lora_scale: float = 1.0):
    """Personalize a loaded pipeline's decoder in place: swap in the UNet folder ``unet``, then add the LoRA file
    ``lora`` at ``lora_scale``. Returns ``pipe``. What ``generate --unet/--lora`` and the evaluations call."""
    if (unet is not None or lora is not None) and getattr(pipe, "unet", None) is None:
        raise UserError("this model has no decoder UNet to personalize; load a model with a decoder")
    swap = getattr(pipe, "_between_stages", None)
    if swap is not None and (unet is not None or lora is not None):
        # --low-memory prior-then-decoder: the decoder's weights load only after the prior has run and been freed,
        # so personalize them then (personalizing the placeholder now would be overwritten by that load).
        def swap_then_personalize(pipeline) -> None:
            swap(pipeline)
            apply_decoder_adapters(pipeline, unet, lora, lora_scale)

        pipe._between_stages = swap_then_personalize
        return pipe
    if unet is not None:
        pipe.unet = load_unet(unet, like=pipe.unet)
    if lora is not None:
        load_lora(pipe.unet, lora, lora_scale)
    return pipe
