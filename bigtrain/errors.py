"""User-facing errors.

Anything the user can fix (a config key, a path, a layout, a checkpoint) raises `UserError`. The
CLI turns it into one line on stderr and exit code 2, with no traceback; everything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


class ConfigError(UserError):
    """A config key, type or value that is not allowed."""
