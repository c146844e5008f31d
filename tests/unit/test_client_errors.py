"""The researcher's client fails in one line that says what to do, never an httpx traceback."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from coordinator.client import AllianceClient
from protocol.errors import ConfigError, LinkError


class _NotAlliance(BaseHTTPRequestHandler):
    """Some other web server: HTML, or JSON of another shape under /json."""

    def do_GET(self) -> None:
        if self.path.endswith("/json"):
            body, kind = b'{"hello": "world"}', "application/json"
        else:
            body, kind = b"<html>It works!</html>", "text/html; charset=utf-8"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def other_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotAlliance)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_another_web_server_is_named_as_not_alliance(other_server: str) -> None:
    with AllianceClient(other_server, "x" * 20) as client, pytest.raises(LinkError) as html:
        client.studies()
    assert str(html.value) == (
        f"the server at {other_server} did not answer as Alliance's HTTP API (HTTP 200, "
        "text/html) (is this the site-link port? the API is the coordinator's `http` address)"
    )
    with AllianceClient(f"{other_server}/json", "x" * 20) as client, pytest.raises(LinkError):
        client.health()


def test_a_server_that_hangs_up_is_one_line() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"

    def hang_up() -> None:
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.close()  # no HTTP answer at all, as a gRPC port does

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    try:
        with AllianceClient(url, "x" * 20) as client, pytest.raises(LinkError) as hung:
            client.studies()
    finally:
        thread.join(timeout=10)
        listener.close()
    assert "did not answer as Alliance's HTTP API" in str(hung.value)
    assert "\n" not in str(hung.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("127.0.0.1:8080", "must start with http:// or https://"),
        ("ftp://127.0.0.1:8080", "must start with http:// or https://"),
        ("http://no-such-host.invalid:8080", "is not reachable"),
    ],
)
def test_a_bad_url_is_one_line(url: str, message: str) -> None:
    with pytest.raises(LinkError, match=message) as bad, AllianceClient(url, "x" * 20) as client:
        client.studies()
    assert "\n" not in str(bad.value)


def test_a_token_with_a_line_break_inside_is_a_config_error_not_an_httpx_one() -> None:
    with pytest.raises(ConfigError, match="characters a token never has"):
        AllianceClient("http://127.0.0.1:9", "abc\ndef")
    AllianceClient("http://127.0.0.1:9", "a-token-pasted-with-a-newline\n").close()  # stripped
