"""How much a command logs: ``--log-level LEVEL`` and ``--quiet``, before or after the command.

The servers (``coordinator serve``, ``site serve``) log one line per change of state by default
(INFO); every other command logs warnings and errors only. ``alliance --log-level DEBUG site
serve ...`` and ``alliance site serve ... --log-level DEBUG`` mean the same; when both are given,
the one after the command wins.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Annotated, Any

import typer

from protocol.errors import ConfigError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
LEVEL_HELP = "how much to log: DEBUG, INFO, WARNING or ERROR"
QUIET_HELP = "log warnings and errors only"
#: The two options every command that logs takes (typer types, shared by both roles' CLIs).
LOG_LEVEL = Annotated[str | None, typer.Option("--log-level", help=LEVEL_HELP)]
QUIET = Annotated[bool, typer.Option("--quiet", help=QUIET_HELP)]
#: Libraries whose own chatter stays out of an admin's log unless DEBUG is asked for.
_CHATTY = ("uvicorn", "uvicorn.error", "asyncio", "grpc")


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is now (test runners swap it per command)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def parse_level(text: str) -> int:
    """The logging level named by ``text`` (any case).

    Raises:
        ConfigError: naming the bad value and the allowed levels.
    """
    name = text.strip().upper()
    if name not in LEVELS:
        raise ConfigError(
            f"--log-level: {text!r} is not a log level; use one of: {', '.join(LEVELS)}"
        )
    level: int = getattr(logging, name)
    return level


def chosen_level(log_level: str | None, quiet: bool) -> int | None:
    """The level one position's options ask for, or None when they ask for nothing.

    Raises:
        ConfigError: for an unknown level, or ``--quiet`` with a level below WARNING.
    """
    if log_level is None:
        return logging.WARNING if quiet else None
    level = parse_level(log_level)
    if quiet and level < logging.WARNING:
        raise ConfigError(
            f"--quiet and --log-level {log_level} contradict each other; give one of them"
        )
    return level


def resolve_level(
    log_level: str | None, quiet: bool, root_params: Mapping[str, Any], default: int
) -> int:
    """A command's level: its own options, else those before the command, else ``default``."""
    own = chosen_level(log_level, quiet)
    if own is not None:
        return own
    before = chosen_level(root_params.get("log_level"), bool(root_params.get("quiet")))
    return before if before is not None else default


def configure(level: int) -> None:
    """Send log records at ``level`` and above to stderr, one line each."""
    root = logging.getLogger()
    if not any(isinstance(h, _Handler) for h in root.handlers):
        root.addHandler(_Handler())
    root.setLevel(level)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(level if level <= logging.DEBUG else logging.WARNING)
