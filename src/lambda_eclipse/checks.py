"""The checks every command shares: finite numbers, a usable device, a writable output path.

One function owns each: :func:`require_finite` (feature data as it is read and validated, subject embeddings,
the training loss), :func:`check_weights_finite` (a model's weights, once at load), :func:`resolve_device`
(``--device`` of every command), :func:`check_output_path` (every command that writes a file or folder). Each
raises a :class:`~lambda_eclipse.errors.UserError` with one line naming the thing and the fix. torch is imported
inside the functions that need it, so the CLI can check paths before it loads anything heavy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch


class NonFiniteError(UserError):
    """Data, weights or a loss hold NaN or inf: the job stops here rather than produce NaN models or black images."""


def first_nonfinite(tensor: torch.Tensor) -> int | None:
    """Index of the first row (dim 0) of ``tensor`` holding NaN or inf, or None when all is finite.

    Costs one pass over the values; integer tensors are finite by construction and skipped.
    """
    import torch

    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return None
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return None
    rows = finite.reshape(finite.shape[0], -1).all(dim=1) if finite.dim() else finite.reshape(1)
    return int((~rows).nonzero()[0, 0])


def require_finite(tensor: torch.Tensor, what: str, fix: str = "", row_name: str = "row") -> None:
    """Raise :class:`NonFiniteError` ("<what> holds NaN or inf at <row_name> i; <fix>") unless ``tensor`` is finite."""
    row = first_nonfinite(tensor)
    if row is not None:
        where = f" at {row_name} {row}" if tensor.dim() > 1 or row_name != "row" else ""
        raise NonFiniteError(f"{what} holds NaN or inf{where}" + (f"; {fix}" if fix else ""))


def check_weights_finite(module: torch.nn.Module, what: str) -> None:
    """Raise :class:`NonFiniteError` naming the first parameter or buffer of ``module`` that holds NaN or inf.

    Run once when a model is loaded: damaged weight bytes (a bad download, a disk error) otherwise load without
    complaint and turn every image black.
    """
    import torch

    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if not tensor.is_floating_point() or not tensor.numel() or tensor.device.type == "meta":
                continue
            # max and min propagate NaN and reach ±inf: two reductions, no tensor-sized temporary
            if not (bool(torch.isfinite(tensor.amax())) and bool(torch.isfinite(tensor.amin()))):
                raise NonFiniteError(f"{what}: weight {name!r} holds NaN or inf (damaged file?); re-download or "
                                     "re-export the model")


def resolve_device(device: str | None) -> torch.device:
    """``--device`` -> a device this machine has: None picks cuda, then mps, then cpu.

    Raises:
        UserError: an unknown device name, or one that this machine (or this torch build) does not have.
    """
    import torch

    if device is None or device == "":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"unknown device {device!r}; choose cpu, cuda, cuda:N or mps") from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (chosen.index is None or chosen.index < torch.cuda.device_count()),
        "mps": torch.backends.mps.is_available(),
    }
    if chosen.type not in available:
        raise UserError(f"unsupported device {device!r}; choose cpu, cuda, cuda:N or mps")
    if not available[chosen.type]:
        have = "cpu" + (f", cuda:0..{torch.cuda.device_count() - 1}" if torch.cuda.is_available() else "") + (
            ", mps" if torch.backends.mps.is_available() else "")
        raise UserError(f"device {device!r} is not available on this machine (it has {have}); choose one of those")
    return chosen


def check_output_path(path: str | os.PathLike, kind: str, flag: str = "--out") -> Path:
    """Check that ``path`` can be written as a ``kind`` ("file" or "folder") before any work starts.

    Missing parent folders are fine (they are created when the output is written); a path whose existing part
    is of the wrong kind, or an ancestor that is a file, is refused, as is a parent that cannot be written.
    """
    target = Path(path)
    if str(path) == "":
        raise UserError(f"{flag} is empty; give a {kind} path")
    if kind == "file" and target.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a folder; give a file name")
    if kind == "folder" and target.exists() and not target.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a file; give a folder")
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise UserError(f"{flag} {str(path)!r} lies under {str(ancestor)!r}, which is a file; choose another path")
    if ancestor.is_dir() and not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {str(path)!r}: cannot write in {str(ancestor)!r} (permission denied); choose another path")
    return target
