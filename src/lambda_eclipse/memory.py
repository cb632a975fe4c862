"""Memory modes for generation: which weights are on the device (or, on a CPU, in RAM) at each moment.

  resident             every component on the device: fastest, needs all the weights (~7.8 GB in fp16 full size)
  model                diffusers' ``enable_model_cpu_offload``: weights on the host, one component on the device at
                       a time (the largest is the bigG vision tower, ~3.7 GB in fp16)
  sequential           diffusers' ``enable_sequential_cpu_offload``: one leaf module on the device at a time; runs
                       on the smallest cards, slowly
  prior-then-decoder   the encoders and the prior are loaded and run, then *freed* (from the device and the host)
                       before the decoder's weights are loaded: the peak is the larger stage, not their sum. It
                       frees host RAM too, so it is also the mode for a CPU with little RAM. One call per load.
  auto                 the fastest mode whose weights fit the free memory (:func:`choose_memory_mode`)

Weight sizes come from the component configs, built on the "meta" device (no memory, no weights read), so ``auto``
decides before anything loads. ``model`` and ``sequential`` move weights between the host and an accelerator; on a
CPU they would free nothing, so they are refused there.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .errors import UserError
from .hub import DEFAULT_DECODER, DEFAULT_ENCODERS

MEMORY_MODES = ("resident", "prior-then-decoder", "model", "sequential")  # fastest first
MODE_CHOICES = MEMORY_MODES + ("auto",)
PRIOR_STAGE = ("text_encoder", "image_encoder", "prior")
DECODER_STAGE = ("unet", "movq")
ACCELERATOR_ONLY = ("model", "sequential")
# Room left beyond the weights, for activations and the runtime. Measured on the full-size stack at 512 px, one
# image, bf16, on a CPU (benchmarks/results/cpu.json): resident peaked at 9.03 GB RSS over 7.79 GB of weights
# (+1.24 GB); 2 GiB covers that with margin. More images per call need more (pass reserve_bytes).
DEFAULT_RESERVE_BYTES = 2 * 1024**3


def component_sources(model: str | os.PathLike) -> dict[str, tuple[str, str | None, type]]:
    """Where each weighted component of ``model`` loads from: name -> (repo or folder, subfolder, class).

    A folder with ``model_index.json`` names its own classes; a prior alone (folder or Hub id) is composed with
    the Kandinsky 2.2 encoders and decoder, as :meth:`LambdaEclipsePipeline.from_pretrained` composes it.
    """
    index = Path(model) / "model_index.json"
    if index.is_file():
        entries = json.loads(index.read_text())
        sources = {}
        for name in PRIOR_STAGE + DECODER_STAGE:
            library, cls_name = entries.get(name) or (None, None)
            if library is not None and cls_name is not None:
                sources[name] = (str(model), name, getattr(importlib.import_module(library), cls_name))
        return sources
    from diffusers import UNet2DConditionModel, VQModel
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from .prior import LambdaEclipsePrior

    return {
        "text_encoder": (DEFAULT_ENCODERS, "text_encoder", CLIPTextModelWithProjection),
        "image_encoder": (DEFAULT_ENCODERS, "image_encoder", CLIPVisionModelWithProjection),
        "prior": (str(model), None, LambdaEclipsePrior),
        "unet": (DEFAULT_DECODER, "unet", UNet2DConditionModel),
        "movq": (DEFAULT_DECODER, "movq", VQModel),
    }


def empty_component(repo: str, subfolder: str | None, cls: type) -> torch.nn.Module:
    """The component built from its config alone, with its weights on the "meta" device (no memory used)."""
    from accelerate import init_empty_weights

    kwargs = {"subfolder": subfolder} if subfolder else {}
    with init_empty_weights():
        if hasattr(cls, "load_config"):  # diffusers ModelMixin / ConfigMixin
            return cls.from_config(cls.load_config(repo, **kwargs))
        return cls(cls.config_class.from_pretrained(repo, **kwargs))


def component_weight_bytes(model: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes of each weighted component's parameters in ``dtype`` (None: float32), from the configs only."""
    size = torch.finfo(dtype or torch.float32).bits // 8
    sources = component_sources(model)
    return {name: sum(p.numel() for p in _empty(name, sources, model).parameters()) * size for name in sources}


def _empty(name: str, sources: dict, model: str | os.PathLike) -> torch.nn.Module:
    """:func:`empty_component` of ``sources[name]``, an unreadable config as a one-line user error."""
    try:
        return empty_component(*sources[name])
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read the {name} config of {str(model)!r} ({first}); give a model folder or Hub id "
                        "you can reach") from None


def mode_needs(weight_bytes: Mapping[str, int]) -> dict[str, int]:
    """Peak weight bytes on the device in each mode (activations not included)."""
    prior = sum(weight_bytes.get(name, 0) for name in PRIOR_STAGE)
    decoder = sum(weight_bytes.get(name, 0) for name in DECODER_STAGE)
    return {"resident": prior + decoder, "prior-then-decoder": max(prior, decoder),
            "model": max(weight_bytes.values(), default=0), "sequential": 0}


def free_memory_bytes(device: str | torch.device) -> int:
    """Free memory where the weights will sit: the accelerator's free memory, or the host's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    raise UserError(f"cannot read the free memory of device {device}; choose a --low-memory mode instead of auto")


def choose_memory_mode(weight_bytes: Mapping[str, int], free_bytes: int, device_type: str,
                       reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> str:
    """The fastest mode whose weights plus ``reserve_bytes`` fit in ``free_bytes`` (on a CPU: resident or
    prior-then-decoder, the modes that change RAM; on an accelerator: sequential when nothing else fits)."""
    needs = mode_needs(weight_bytes)
    modes = [m for m in MEMORY_MODES if device_type != "cpu" or m not in ACCELERATOR_ONLY]
    for mode in modes:
        if needs[mode] + reserve_bytes <= free_bytes:
            return mode
    return modes[-1]


def check_memory_mode(mode: str, device: str | torch.device) -> None:
    """Refuse a mode name that does not exist, or an accelerator-only mode on a CPU."""
    if mode not in MODE_CHOICES:
        raise UserError(f"unknown memory mode {mode!r}; choose one of {', '.join(MODE_CHOICES)}")
    if mode in ACCELERATOR_ONLY and torch.device(device).type == "cpu":
        raise UserError(f"--low-memory {mode} moves weights between the host and a GPU and frees nothing on a CPU; "
                        "use prior-then-decoder (frees the encoders before the decoder loads) or resident")


def load_with_memory_mode(load: Callable[..., object], model: str, device: str | torch.device, mode: str,
                          torch_dtype: torch.dtype | None = None):
    """Load a pipeline with ``load(model, **kwargs)`` (``LambdaEclipsePipeline.from_pretrained``) and place it for
    ``mode`` ("auto" resolved here). Returns (pipeline, mode used)."""
    check_memory_mode(mode, device)
    dtype_kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if mode == "auto":
        mode = choose_memory_mode(component_weight_bytes(model, torch_dtype), free_memory_bytes(device),
                                  torch.device(device).type)
    if mode == "prior-then-decoder":
        return _load_prior_then_decoder(load, model, device, dtype_kwargs), mode
    pipe = load(model, **dtype_kwargs)
    if mode == "resident":
        # float16 does run on today's CPUs; diffusers' "will fail" warning for it is out of date
        pipe.to(device, silence_dtype_warnings=True)
    elif mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    return pipe, mode


def _load_prior_then_decoder(load, model, device, dtype_kwargs):
    """The encoders and prior loaded on ``device``; the decoder as config-only "meta" modules (so every input
    check and the default size work) whose weights load only after the encoders and prior are freed."""
    sources = component_sources(model)
    if (Path(model) / "model_index.json").is_file():
        empty = {name: _empty(name, sources, model) for name in DECODER_STAGE if name in sources}
        pipe = load(model, **empty, **dtype_kwargs)
    else:  # a prior alone: compose it without a decoder (this checks the model), then attach the decoder's shapes
        from diffusers import DDPMScheduler

        pipe = load(model, decoder_repo=None, **dtype_kwargs)
        empty = {name: _empty(name, sources, model) for name in DECODER_STAGE}
        pipe.register_modules(scheduler=DDPMScheduler.from_pretrained(DEFAULT_DECODER, subfolder="scheduler"), **empty)
    for name in PRIOR_STAGE:
        getattr(pipe, name).to(device)

    def swap_stages(pipeline) -> None:
        # Drop every reference to the encoders and the prior, so that their memory is returned before the
        # decoder's weights are read.
        pipeline.register_modules(**{name: None for name in PRIOR_STAGE})
        import gc

        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        loaded = {}
        for name in empty:
            repo, subfolder, cls = sources[name]
            kwargs = {"subfolder": subfolder} if subfolder else {}
            loaded[name] = cls.from_pretrained(repo, **kwargs, **dtype_kwargs).to(device)
        pipeline.register_modules(**loaded)
        pipeline._between_stages = None

    pipe._between_stages = swap_stages
    return pipe
