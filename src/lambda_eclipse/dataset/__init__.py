"""The interleaved dataset builder (captions → subject nouns → boxes → masks → CLIP features).

Only the last stage lives here so far: :mod:`.features` turns captioned images and subject crops into feature
samples; the miniature world feeds it directly with rendered scenes.
"""

from .features import CaptionedImage, ClipEncoders, encode_records, encode_stream

__all__ = ["CaptionedImage", "ClipEncoders", "encode_records", "encode_stream"]
