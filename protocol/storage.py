"""File and SQLite helpers both roles use."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from protocol.errors import ConfigError


def write_new_file(path: Path, data: bytes, private: bool) -> None:
    """Write a file that must not exist yet; a private one (a key) is 0600 from the start,
    never briefly readable by others.

    Raises:
        ConfigError: the file exists already, or cannot be created.
    """
    mode = 0o600 if private else 0o644
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(f"{path}: already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create ({exc.strerror})") from None
    with os.fdopen(fd, "wb") as handle:
        # The umask may have narrowed the mode; make it exact either way.
        os.fchmod(handle.fileno(), mode)
        handle.write(data)


def connect_read_only(path: Path) -> sqlite3.Connection:
    """Open ``path`` read-only (``mode=ro``), creating no file next to it.

    A WAL database opened with ``mode=ro`` alone gets new ``-wal`` and ``-shm`` files when none
    exist. No ``-wal`` file means no process has the file open (a clean close checkpoints and
    removes it), so the file is complete and is opened ``immutable``, which creates nothing.
    """
    uri = path.resolve().as_uri() + "?mode=ro"
    if not path.with_name(path.name + "-wal").exists():
        uri += "&immutable=1"
    return sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
