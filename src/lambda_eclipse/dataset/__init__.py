"""The interleaved dataset builder (paper §3.2, appendix B): images -> captions -> subject nouns -> boxes -> masks ->
filters -> subject crops -> CLIP features.

One module per stage (:mod:`.caption`, :mod:`.nouns`, :mod:`.ground`, :mod:`.segment`, :mod:`.filters`,
:mod:`.crop`, :mod:`.features`), each a batched function over records; :mod:`.stages` applies them,
:mod:`.runner` runs them shard by shard and resumably (`lambda-eclipse build-dataset`), :mod:`.ray_engine` runs
the same stage functions on Ray Data. The miniature world feeds :mod:`.features` directly with rendered scenes.
Heavy dependencies (spaCy, Ray, the detector/segmenter/captioner) are imported only where used.
"""

from .config import BuildConfig, load_build_config
from .features import CaptionedImage, ClipEncoders, encode_records, encode_stream
from .records import Box, Record
from .runner import build_dataset

__all__ = ["Box", "BuildConfig", "CaptionedImage", "ClipEncoders", "Record", "build_dataset", "encode_records",
           "encode_stream", "load_build_config"]
