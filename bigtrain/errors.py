"""User-facing errors.

Anything the user can fix (a config key, a path, a layout, a checkpoint) raises `UserError`. The
CLI turns it into one line on stderr and exit code 2, with no traceback; everything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


class ConfigError(UserError):
    """A config key, type or value that is not allowed."""


ERROR_DIR_ENV = "BIGTRAIN_ERROR_DIR"
"""Set by launch/train.sh: each rank leaves its one-line user error in this directory (instead of
printing it), and the launcher prints the lowest rank's line once and exits 2."""


def check_writable_dir(path, what: str) -> None:
    """Refuse, up front and in one line, an output directory that cannot be created or written: a
    file, a path through a file, or a read-only place. `what` names it (e.g. "train.out_dir").
    Creates nothing (a probe file in the nearest existing directory is removed at once)."""
    import os
    import tempfile
    from pathlib import Path

    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {str(path)!r} is a file, not a directory; choose a directory (it is created if missing)")
    probe = p
    while not probe.exists() and probe.parent != probe:  # mkdir -p writes into the nearest existing one
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what} {str(path)!r} cannot be created: {str(probe)!r} is a file, not a directory")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".bigtrain-write-test-")
    except OSError as e:
        raise UserError(f"{what} {str(path)!r} is not writable ({str(probe)!r}: {e.strerror}); "
                        f"choose a directory you can write") from None
    os.close(fd)
    os.unlink(name)
