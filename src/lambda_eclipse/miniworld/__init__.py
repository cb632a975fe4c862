"""The miniature world: procedural scenes, and the recipes that train the tiny model family shipped offline.

Scenes and vocabularies import light (numpy, PIL, the tokenizer); the training recipes (torch, diffusers)
load on first use of :func:`build_components` / :class:`BuildConfig`.
"""

from __future__ import annotations

from typing import Any

from .scenes import RESERVED_INSTANCES, Scene, SceneObject, iter_scenes, render_scene, sample_scenes, scene_seed
from .vocab import (
    BG_COLOURS,
    BG_KINDS,
    COLOURS,
    HELDOUT_TEMPLATES,
    RELATIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    TEXTURES,
    TRAIN_TEMPLATES,
    build_word_tokenizer,
    caption_vocabulary,
    miniworld_tokenizer,
)

_LAZY = {"build_components": "build", "BuildConfig": "build", "smoke_config": "build", "COMPONENTS": "build"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BG_COLOURS",
    "BG_KINDS",
    "COLOURS",
    "COMPONENTS",
    "HELDOUT_TEMPLATES",
    "RELATIONS",
    "RESERVED_INSTANCES",
    "SHAPES",
    "SIZES",
    "TEMPLATES",
    "TEXTURES",
    "TRAIN_TEMPLATES",
    "BuildConfig",
    "Scene",
    "SceneObject",
    "build_components",
    "build_word_tokenizer",
    "caption_vocabulary",
    "iter_scenes",
    "miniworld_tokenizer",
    "render_scene",
    "sample_scenes",
    "scene_seed",
    "smoke_config",
]
