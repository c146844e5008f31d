"""Real gRPC mutual TLS with certificates from ``coordinator.pki``, on 127.0.0.1.

A site with a certificate from the alliance CA gets through and the server reads its identity
from the certificate's CN; a certificate from another CA, or none, is refused during the TLS
handshake, before any RPC handler runs. The texts the client sees, and what gRPC core prints
on the server's stderr, are pinned here because the site node and the coordinator log them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from coordinator import pki

SERVICE = "alliance.test.Echo"
METHOD = f"/{SERVICE}/WhoAmI"


def _who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
    """Answer with the CN the server read from the client's certificate."""
    # grpc-stubs types the values as bytes; they are lists of bytes.
    auth: dict[str, list[bytes]] = dict(context.auth_context())  # type: ignore[arg-type]
    assert context.peer_identity_key() == "x509_common_name"
    return b"|".join(auth["x509_common_name"] + auth["x509_subject"])


@pytest.fixture(scope="module")
def pki_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    ours, other = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("other")
    for folder in (ours, other):
        pki.init_ca(folder, "Cardio Alliance")
        pki.issue_site(folder, "cleveland")
        pki.issue_coordinator(folder)
    return ours, other


def serve_coordinator(
    folder: Path, handlers: list[grpc.GenericRpcHandler]
) -> tuple[grpc.Server, int]:
    """A started gRPC server with the coordinator's certificate from ``folder``, asking every
    client for a certificate from that folder's CA; and its port on 127.0.0.1."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=handlers)
    credentials = grpc.ssl_server_credentials(
        [((folder / "coordinator.key").read_bytes(), (folder / "coordinator.pem").read_bytes())],
        root_certificates=(folder / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    bound = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, bound


def site_files(folder: Path, name: str = "cleveland") -> tuple[Path, Path]:
    """A site's certificate and key, as ``alliance pki issue-site`` wrote them."""
    return folder / "sites" / f"{name}.pem", folder / "sites" / f"{name}.key"


@pytest.fixture(scope="module")
def port(pki_dirs: tuple[Path, Path]) -> Iterator[int]:
    ours, _ = pki_dirs
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"WhoAmI": grpc.unary_unary_rpc_method_handler(_who_am_i)}
    )
    server, bound = serve_coordinator(ours, [handler])
    yield bound
    server.stop(grace=None)


def call(
    port: int, ca: Path, cert: Path | None, key: Path | None, host: str = "127.0.0.1"
) -> bytes:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    with grpc.secure_channel(f"{host}:{port}", credentials) as channel:
        stub = channel.unary_unary(METHOD, None, None)  # raw bytes both ways
        return stub(b"", timeout=10)  # type: ignore[no-any-return]


def refused(port: int, ca: Path, cert: Path | None, key: Path | None) -> str:
    """The details of the UNAVAILABLE error a refused client gets."""
    with pytest.raises(grpc.RpcError) as info:
        call(port, ca, cert, key)
    error = info.value
    assert isinstance(error, grpc.Call)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    details = error.details()
    assert details is not None
    return details


def test_site_from_our_ca_connects_and_server_sees_its_cn(
    port: int, pki_dirs: tuple[Path, Path]
) -> None:
    ours, _ = pki_dirs
    answer = call(port, ours / "ca.pem", *site_files(ours))
    assert answer == b"cleveland|CN=cleveland,O=Cardio Alliance"
    # The coordinator's SANs cover the DNS name too.
    host = call(port, ours / "ca.pem", *site_files(ours), host="localhost")
    assert host.startswith(b"cleveland|")


def test_site_from_another_ca_is_refused(port: int, pki_dirs: tuple[Path, Path]) -> None:
    ours, other = pki_dirs
    # Same CN and same CA subject: only the signature differs. In TLS 1.3 the server rejects
    # the client certificate after the client has finished its side of the handshake, so the
    # client only learns that the socket was closed.
    details = refused(port, ours / "ca.pem", *site_files(other))
    assert details.startswith("failed to connect to all addresses; last error: UNAVAILABLE")
    assert details.endswith("Socket closed")


def test_site_without_certificate_is_refused(port: int, pki_dirs: tuple[Path, Path]) -> None:
    ours, _ = pki_dirs
    details = refused(port, ours / "ca.pem", None, None)
    assert details.endswith("Socket closed")


def test_site_trusting_another_ca_refuses_the_coordinator(
    port: int, pki_dirs: tuple[Path, Path]
) -> None:
    # The other direction: the site's ca.pem is not the one that signed the coordinator.
    ours, other = pki_dirs
    details = refused(port, other / "ca.pem", *site_files(ours))
    assert "Tls handshake failed" in details
    assert "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate" in details


def test_coordinator_name_not_in_sans_is_refused_by_the_site(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, "A")
    pki.issue_site(tmp_path, "basel")
    pki.issue_coordinator(tmp_path, hosts=["coord.alliance.example"])
    server, bound = serve_coordinator(tmp_path, [])
    try:
        details = refused(bound, tmp_path / "ca.pem", *site_files(tmp_path, "basel"))
        assert "Hostname Verification Check failed" in details
    finally:
        server.stop(grace=None)


# A coordinator-like server in its own process, so its stderr (where gRPC core logs) is ours to
# read. It prints its port, serves until stdin closes, then exits.
_SERVER = textwrap.dedent(
    """
    import sys
    from concurrent import futures
    import grpc
    folder = sys.argv[1]
    read = lambda name: open(f"{folder}/{name}", "rb").read()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    credentials = grpc.ssl_server_credentials(
        [(read("coordinator.key"), read("coordinator.pem"))],
        root_certificates=read("ca.pem"), require_client_auth=True)
    print(server.add_secure_port("127.0.0.1:0", credentials), flush=True)
    server.start()
    sys.stdin.read()
    server.stop(None)
    """
)


def _server_stderr_after_refusals(pki_dirs: tuple[Path, Path], verbosity: str | None) -> str:
    ours, other = pki_dirs
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    if verbosity is not None:
        env["GRPC_VERBOSITY"] = verbosity
    with subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(ours)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        try:
            server_port = int(proc.stdout.readline())
            refused(server_port, ours / "ca.pem", *site_files(other))
            refused(server_port, ours / "ca.pem", None, None)
        finally:
            _, stderr = proc.communicate("", timeout=30)
    assert proc.returncode == 0, stderr
    return stderr


@pytest.mark.parametrize("verbosity", [None, "INFO"])
def test_grpc_core_logs_refused_handshakes_on_stderr(
    pki_dirs: tuple[Path, Path], verbosity: str | None
) -> None:
    # gRPC core writes these itself (absl logging to file descriptor 2, INFO severity, not
    # Python's logging), with the reason but without the peer's address or certificate.
    stderr = _server_stderr_after_refusals(pki_dirs, verbosity)
    failures = [line for line in stderr.splitlines() if "Handshake failed" in line]
    assert len(failures) == 2, stderr
    assert "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate" in failures[0]
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in failures[1]
    assert all("ssl_transport_security.cc" in line for line in failures)
    assert not any("127.0.0.1" in line for line in failures)


def test_grpc_verbosity_error_silences_refused_handshakes(pki_dirs: tuple[Path, Path]) -> None:
    assert _server_stderr_after_refusals(pki_dirs, "ERROR") == ""
