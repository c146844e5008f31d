"""SQLite helpers both roles' stores use."""

from __future__ import annotations

import sqlite3
from pathlib import Path


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
