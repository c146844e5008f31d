"""Relay gRPC core's own stderr lines into the coordinator's log, in plain words.

gRPC core reports a refused TLS handshake (a site with a certificate from another CA, or none)
only on file descriptor 2, in its own format and without the peer's address. This relay puts a
pipe in front of descriptor 2, rewrites those lines as coordinator log entries that say what
happened, and passes every other line through unchanged.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("alliance.coordinator")

_REASONS = {
    "CERTIFICATE_VERIFY_FAILED": "its certificate was not issued by the alliance CA",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "it presented no certificate",
    "CERTIFICATE_EXPIRED": "its certificate has expired",
    "WRONG_VERSION_NUMBER": "it did not speak TLS (a site configured with insecure: true?)",
}


def describe_handshake_failure(line: str) -> str | None:
    """A plain-words log message for a gRPC core handshake failure line, or None."""
    if "Handshake failed" not in line:
        return None
    reason = next((text for key, text in _REASONS.items() if key in line), None)
    detail = line.split("]", 1)[-1].strip()
    return (
        "refused a connection on the site link: TLS handshake failed"
        + (f" because {reason}" if reason else "")
        + f" ({detail})"
    )


def relay_grpc_stderr() -> None:
    """Start relaying descriptor 2 through a daemon thread (idempotent enough for one process)."""
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with (
            os.fdopen(read_end, "r", errors="replace") as lines,
            os.fdopen(original, "w", buffering=1) as out,
        ):
            for line in lines:
                message = describe_handshake_failure(line)
                if message is None:
                    out.write(line)
                else:
                    # Our handler writes to descriptor 2 too; write the rewritten line directly
                    # so it cannot come back through the pipe.
                    out.write(
                        logging.Formatter(
                            "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"
                        ).format(
                            log.makeRecord(
                                log.name, logging.WARNING, __file__, 0, message, (), None
                            )
                        )
                        + "\n"
                    )

    threading.Thread(target=pump, name="grpc-stderr-relay", daemon=True).start()
