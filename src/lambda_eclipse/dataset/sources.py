"""Builder inputs: a folder of images, a webdataset tar set, or img2dataset output (tar or parquet shards).

Every input image becomes a :class:`SourceRef` (a stable ``source_id`` plus where to read it), listed once in a
fixed order, so the runner can cut the list into shards that mean the same thing on every rerun. Images are
decoded by :func:`open_image`, which turns every unreadable case (corrupt, truncated, huge) into
:class:`BadImage` so that one bad file is skipped and listed, never fatal.
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
CAPTION_SUFFIXES = (".txt", ".caption")


class BadImage(Exception):
    """An input that cannot be used as an image; the message says why (it goes into the skipped list)."""


@dataclass(frozen=True)
class SourceRef:
    """Where one input image lives.

    Attributes:
        source_id: stable, unique id (relative path, or ``<tar>/<key>``, or ``<parquet>/<row>``).
        kind: ``file``, ``tar`` or ``parquet``.
        path: the file, tar or parquet file.
        member: tar member name or parquet row number (as text); empty for plain files.
        caption: the caption shipped with the image (sidecar ``.txt``, tar ``.txt``/``.json``, parquet column).
        target: a folder input's ``<name>.target.<ext>`` beside the image, when there is one: the picture the
            ``features`` stage encodes as the sample's target and edge map instead of the image (say, the picture at
            the decoder's resolution, while boxes, masks and crops come from the full-resolution image); empty: the
            image itself.
    """

    source_id: str
    kind: str
    path: str
    member: str = ""
    caption: str = ""
    target: str = ""

    def to_json(self) -> dict:
        return {"source_id": self.source_id, "kind": self.kind, "path": self.path, "member": self.member,
                "caption": self.caption, "target": self.target}

    def target_ref(self) -> SourceRef:
        """Where the features stage reads this input's target picture."""
        return SourceRef(self.source_id, "file", self.target) if self.target else self


def _tar_refs(tar_path: Path, root: Path) -> list[SourceRef]:
    groups: dict[str, dict[str, str]] = {}
    captions: dict[str, str] = {}
    try:
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition(".")
                ext = "." + ext.lower()
                if ext in IMAGE_SUFFIXES:
                    groups.setdefault(key, {})["image"] = member.name
                elif ext in CAPTION_SUFFIXES:
                    captions[key] = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                elif ext == ".json" and key not in captions:
                    try:
                        meta = json.loads(tar.extractfile(member).read())
                        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
                            captions[key] = meta["caption"].strip()
                    except ValueError:
                        pass
    except (tarfile.TarError, OSError) as error:
        raise UserError(f"input tar {str(tar_path)!r} cannot be read ({error}); re-download or remove it") from None
    rel = tar_path.relative_to(root) if tar_path != root else Path(tar_path.name)
    return [SourceRef(f"{rel}/{key}", "tar", str(tar_path), g["image"], captions.get(key, ""))
            for key, g in sorted(groups.items())]


def _parquet_refs(path: Path, root: Path) -> list[SourceRef]:
    """img2dataset ``output_format=parquet``: one row per image, the bytes in ``jpg`` (or ``png``/``webp``)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading parquet input needs pyarrow; run `pip install pyarrow` (or the `ray` extra)") from None
    table = pq.read_table(path, columns=None)
    names = table.column_names
    if not any(c in names for c in ("jpg", "png", "webp")):
        return []  # img2dataset's per-shard metadata parquet beside the tars: no image bytes
    captions = table.column("caption").to_pylist() if "caption" in names else [""] * table.num_rows
    keys = table.column("key").to_pylist() if "key" in names else [str(i) for i in range(table.num_rows)]
    rel = path.relative_to(root) if path != root else Path(path.name)
    return [SourceRef(f"{rel}/{key}", "parquet", str(path), str(i), (cap or "").strip())
            for i, (key, cap) in enumerate(zip(keys, captions))]


def list_sources(path: str | Path) -> list[SourceRef]:
    """Every input image under ``path`` (a folder, a ``.tar``, or a ``.parquet``), in a fixed sorted order."""
    root = Path(path)
    if not root.exists():
        raise UserError(f"input {str(root)!r} does not exist; give a folder of images, .tar shards or .parquet files")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    images = {f.with_suffix("") for f in files if f.suffix.lower() in IMAGE_SUFFIXES}
    targets = {f.with_suffix("").with_suffix(""): f for f in files  # <name>.target.<ext> beside an image <name>.<ext>
               if f.suffix.lower() in IMAGE_SUFFIXES and f.with_suffix("").suffix == ".target"
               and f.with_suffix("").with_suffix("") in images}
    refs: list[SourceRef] = []
    for f in files:
        suffix = f.suffix.lower()
        if f in targets.values():
            continue  # another image's target picture, not an input of its own
        if suffix in IMAGE_SUFFIXES:
            sidecar = next((f.with_suffix(s) for s in CAPTION_SUFFIXES if f.with_suffix(s).is_file()), None)
            caption = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar else ""
            target = str(targets.get(f.with_suffix(""), ""))
            refs.append(SourceRef(str(f.relative_to(root)) if f != root else f.name, "file", str(f), "", caption,
                                  target))
        elif suffix == ".tar":
            refs.extend(_tar_refs(f, root))
        elif suffix == ".parquet":
            refs.extend(_parquet_refs(f, root))
    if not refs:
        raise UserError(f"no images found under {str(root)!r}; give a folder of .jpg/.png, .tar shards or .parquet files")
    return refs


def _read_bytes(ref: SourceRef) -> bytes:
    if ref.kind == "file":
        return Path(ref.path).read_bytes()
    if ref.kind == "tar":
        with tarfile.open(ref.path) as tar:
            return tar.extractfile(ref.member).read()
    import pyarrow.parquet as pq

    table = pq.read_table(ref.path)
    column = next(c for c in ("jpg", "png", "webp") if c in table.column_names)
    return table.column(column)[int(ref.member)].as_py()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: CMYK and palette convert, 16-bit greyscale is scaled (not clipped) to 8 bits,
    transparency is composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(ref: SourceRef, max_pixels: int) -> Image.Image:
    """Decode one input fully into RGB; raise :class:`BadImage` (with the reason) when it cannot be used."""
    previous = Image.MAX_IMAGE_PIXELS
    try:
        data = _read_bytes(ref)
        Image.MAX_IMAGE_PIXELS = max_pixels
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()  # decode now: a truncated file fails here, not in a model
                image = to_rgb(ImageOps.exif_transpose(opened))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"over {max_pixels} pixels (raise input.max_pixels to accept it)") from None
    except UnidentifiedImageError:
        raise BadImage("not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError, KeyError, tarfile.TarError) as error:
        raise BadImage(f"cannot be decoded ({error})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return image
