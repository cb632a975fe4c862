"""The interleaved dataset builder (paper §3.2, appendix B): images -> captions -> subject nouns -> boxes -> masks ->
filters -> subject crops -> CLIP features.

One module per stage (:mod:`.caption`, :mod:`.nouns`, :mod:`.ground`, :mod:`.segment`, :mod:`.filters`,
:mod:`.crop`, :mod:`.features`), each a batched function over records; :mod:`.stages` applies them,
:mod:`.runner` runs them shard by shard and resumably (`lambda-eclipse build-dataset`), :mod:`.ray_engine` runs
the same stage functions on Ray Data. The miniature world cuts its subject crops with :mod:`.crop` and writes its
stores with :mod:`.features`.
Heavy dependencies (spaCy, Ray, the detector/segmenter/captioner) are imported only where used.
"""

from __future__ import annotations

from typing import Any

# Names resolve on first use, so that importing one light module (say :mod:`.crop`, numpy and PIL only) does not
# load torch and the encoders with the package.
_LAZY = {"BuildConfig": "config", "load_build_config": "config", "CaptionedImage": "features",
         "ClipEncoders": "features", "encode_records": "features", "encode_stream": "features", "Box": "records",
         "Record": "records", "build_dataset": "runner"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
