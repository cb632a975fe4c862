"""The one exception type for user mistakes.

The CLI turns a :class:`UserError` into a single line on stderr and a non-zero exit, with no traceback.
Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake in what the user asked for (bad path, bad prompt, bad option); the message names the fix."""
