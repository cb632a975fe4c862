"""The one exception type for user mistakes.

The CLI turns a :class:`UserError` into a single line on stderr and a non-zero exit, with no traceback.
Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake in what the user asked for (bad path, bad prompt, bad option); the message names the fix."""


class UserTypeError(UserError, TypeError):
    """An argument of the wrong type (a list where a mapping belongs, ``prompt=None``): a ``TypeError`` for Python
    callers, and still a :class:`UserError` (one line, exit 2) for the CLI."""


def one_line(error: BaseException) -> str:
    """The user-facing line of ``error``. A UserError raised in a DataLoader worker comes back re-wrapped with the
    worker's traceback in its message; its last line is the original message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        head, sep, tail = last.partition(": ")
        return tail if sep and head.split(".")[-1].endswith("Error") else last
    return text.splitlines()[0] if text else type(error).__name__
