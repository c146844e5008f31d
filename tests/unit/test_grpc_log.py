"""gRPC core's handshake failure lines become plain-words coordinator log entries."""

from __future__ import annotations

import pytest

from coordinator.grpc_log import describe_handshake_failure

HANDSHAKE = "Handshake failed with error SSL_ERROR_SSL: error:"
PREFIX = "I0000 00:00:1763840000.1 12795 ssl_transport_security.cc:2563] "


@pytest.mark.parametrize(
    ("core_line", "reason"),
    [
        (
            HANDSHAKE + "1000007d:SSL routines:OPENSSL_internal"
            ":CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate",
            "its certificate was not issued by the alliance CA",
        ),
        (
            HANDSHAKE + "100000c0:SSL routines:OPENSSL_internal"
            ":PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid certificate verification context",
            "it presented no certificate",
        ),
        (
            HANDSHAKE + "100000f7:SSL routines:OPENSSL_internal"
            ":WRONG_VERSION_NUMBER: Invalid certificate verification context",
            "it did not speak TLS (a site configured with insecure: true?)",
        ),
    ],
)
def test_each_refusal_reason_is_named(core_line: str, reason: str) -> None:
    message = describe_handshake_failure(PREFIX + core_line)
    assert message == (
        f"refused a connection on the site link: TLS handshake failed because {reason} "
        f"({core_line})"
    )


def test_other_lines_pass_through_untouched() -> None:
    assert describe_handshake_failure("E0000 something else entirely") is None
