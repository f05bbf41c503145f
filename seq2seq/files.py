"""Writing files so that a crash never leaves a part: every file the toolkit writes (checkpoints,
the tokenizer, ``recipe.toml``, ``translate --output``) goes through :func:`atomic_write`."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; some platforms cannot open directories, which is harmless."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb",
                 encoding: str | None = None) -> Iterator[IO[Any]]:
    """A file that appears at ``path`` only when the block completes: a crash leaves the old file
    or the new one, never a part.

    The data goes to a uniquely named temporary file in the same directory (same filesystem, so
    ``os.replace`` is atomic), is flushed and fsynced, renamed over ``path``, and the directory
    is fsynced. On any error (or Ctrl-C) the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; outputs are shared like other files
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)
