"""The HTTP API cannot be overwhelmed or crashed by one request (issue 6, hole 8).

A real uvicorn server on loopback runs the coordinator's app over a real store and an empty
site registry: every request here is refused (or stalls) before a task would leave.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.store import Store
from coordinator.studies import StudyBook
from protocol.config import AnalysisRequest, StudyConfig
from simulations.heart import heart_dictionary
from tests.api_shape import assert_api_error
from tests.served_api import served_app

LEAD = "lead-token-for-the-limit-tests"
AUTH = {"Authorization": f"Bearer {LEAD}"}
MiB = 1 << 20


class ProbedStudies(StudyBook):
    """The real study book; ``delay`` makes its request check slow, ``crash`` makes it a bug."""

    delay = 0.0
    crash = False

    def check_request(self, study: StudyConfig, request: AnalysisRequest) -> Any:
        params = super().check_request(study, request)
        if self.crash:
            raise RuntimeError("a bug nobody expected")
        time.sleep(self.delay)  # blocking on purpose: a slow validation holds its thread
        return params


@dataclass
class Served:
    url: str
    host: str
    port: int
    studies: ProbedStudies


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    store = Store(f"sqlite:///{tmp_path / 'coordinator.db'}")
    studies = ProbedStudies(store, heart_dictionary())
    try:
        with served_app(store, LEAD, studies=studies, task_timeout=2.0) as port:
            url = f"http://127.0.0.1:{port}"
            # quorum 0: active at once (no site approves in these HTTP tests)
            study = {"id": "s1", "title": "limits", "privacy": {"mode": "off"}, "quorum": 0}
            assert httpx.post(f"{url}/api/studies", headers=AUTH, json=study).status_code == 200
            yield Served(url, "127.0.0.1", port, studies)
    finally:
        store.close()


def submit(served: Served, content: bytes | None = None, **kwargs: Any) -> httpx.Response:
    return httpx.post(
        f"{served.url}/api/studies/s1/requests",
        headers={**AUTH, "Content-Type": "application/json"},
        content=content,
        timeout=60,
        **kwargs,
    )


def read_response(conn: socket.socket) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"the server closed the connection without a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length"))
    while len(body) < length:
        body += conn.recv(65536)
    return int(lines[0].split()[1]), body[:length]


def as_response(status: int, body: bytes) -> httpx.Response:
    return httpx.Response(status, content=body, headers={"content-type": "application/json"})


# ----------------------------------------------------------------------------- body size


def test_a_body_declared_too_large_is_refused_before_it_is_read(served: Served) -> None:
    with socket.create_connection((served.host, served.port), timeout=10) as conn:
        conn.sendall(
            b"POST /api/studies/s1/requests HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {LEAD}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 200000000\r\n\r\n"
            + b'{"analysis": "count", "params": {"x": "'
        )  # and not one byte more: the answer must not wait for the 200 MB
        status, body = read_response(conn)
    assert_api_error(as_response(status, body), 413, "larger than the 1048576 bytes allowed")


def test_a_streamed_body_is_refused_once_it_passes_the_limit_not_after_it_ends(
    served: Served,
) -> None:
    chunk = b"a" * 65536
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    with socket.create_connection((served.host, served.port), timeout=10) as conn:
        conn.sendall(
            b"POST /api/studies/s1/requests HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {LEAD}\r\n".encode()
            + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b'5\r\n{"x":\r\n'
        )
        # An attacker streams 64 MiB with no Content-Length; stop as soon as the server answers.
        while sent < 64 * MiB:
            readable, _, _ = select.select([conn], [], [], 0)
            if readable:
                break
            try:
                conn.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        status, body = read_response(conn)
    assert_api_error(as_response(status, body), 413, "larger than the 1048576 bytes allowed")
    # The limit plus what the two sockets' buffers hold: the server stopped reading early.
    assert sent < 16 * MiB, f"the server read {sent / MiB:.0f} MiB before refusing"


def test_a_body_under_the_limit_is_read_as_usual(served: Served) -> None:
    padding = " " * (MiB - 200)
    response = submit(served, f'{{"analysis": "count",{padding}"bogus": 1}}'.encode())
    assert_api_error(response, 400, "request: bogus: is not a known field")


# ----------------------------------------------------------------------------- JSON


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b'{"analysis": "count", "epsilon": Infinity}',
            "epsilon: Infinity is not a finite number",
        ),
        (
            b'{"analysis": "mean", "params": {"variable": NaN}}',
            "params.variable: NaN is not a finite number",
        ),
        (
            b'{"analysis": "quantiles", "params": {"probs": [0.5, -Infinity]}}',
            "params.probs[1]: -Infinity is not a finite number",
        ),
        (b'{"analysis": "count", "epsilon": 1e999}', "epsilon: 1e999 is not a finite number"),
    ],
    ids=["infinity", "nan", "minus-infinity-in-a-list", "overflow"],
)
def test_non_finite_numbers_are_refused_naming_where(
    served: Served, content: bytes, message: str
) -> None:
    assert_api_error(submit(served, content), 400, message)


def test_deep_nesting_is_refused_in_the_one_shape(served: Served) -> None:
    attack = b'{"analysis": "count", "params": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    assert_api_error(submit(served, attack), 400, "nested deeper than 32 levels")
    just_over = b'{"analysis": "count", "params": {"x": ' + b"[" * 31 + b"]" * 31 + b"}}"
    assert_api_error(
        submit(served, just_over), 400, "params.x" + "[0]" * 30 + ": nested deeper than 32 levels"
    )
    allowed = b'{"analysis": "count", "params": {"x": ' + b"[" * 30 + b"]" * 30 + b"}}"
    assert_api_error(submit(served, allowed), 400, "x: is not a known field")


def test_an_unexpected_bug_is_a_500_in_the_one_shape(served: Served) -> None:
    served.studies.crash = True
    response = submit(served, b'{"analysis": "count"}')
    assert_api_error(response, 500, "internal error")
    assert "probably a bug" in response.json()["error"]


# ----------------------------------------------------------------------------- model size

TWELVE = "disease ~ age*sex*cp*trestbps*chol*fbs*restecg*thalach*exang*oldpeak*slope*thal"


def test_a_glm_with_too_many_columns_is_refused_quickly_with_its_count(served: Served) -> None:
    started = time.perf_counter()
    response = submit(
        served, json={"analysis": "glm", "params": {"formula": TWELVE, "family": "binomial"}}
    )
    took = time.perf_counter() - started
    assert_api_error(
        response,
        400,
        f"formula {TWELVE!r} has 27,648 model columns; study s1 allows at most 200 "
        "(max_model_columns)",
    )
    assert took < 2.0, f"counting the columns took {took:.1f} s"


def test_a_formula_power_that_would_take_minutes_to_expand_is_refused(served: Served) -> None:
    formula = "disease ~ (age + trestbps + chol + fbs + thalach + exang + oldpeak)**7"
    started = time.perf_counter()
    response = submit(served, json={"analysis": "glm", "params": {"formula": formula}})
    assert_api_error(response, 400, "**7")
    assert time.perf_counter() - started < 2.0


def test_a_study_sets_its_own_column_limit_for_cox_too(served: Served) -> None:
    small = {
        "id": "small",
        "title": "small models",
        "max_model_columns": 5,
        "privacy": {"mode": "off"},
        "quorum": 0,
    }
    assert httpx.post(f"{served.url}/api/studies", headers=AUTH, json=small).status_code == 200
    cox = {"time": "age", "event": "disease", "covariates": ["cp", "restecg"]}  # 3 + 2 columns
    url = f"{served.url}/api/studies/small/requests"
    fits = httpx.post(url, headers=AUTH, json={"analysis": "cox", "params": cox}, timeout=30)
    assert fits.status_code == 200, fits.text  # allowed (no site is connected to run it)
    cox["covariates"] = ["cp", "restecg", "slope"]
    assert_api_error(
        httpx.post(url, headers=AUTH, json={"analysis": "cox", "params": cox}, timeout=30),
        400,
        "covariates cp, restecg, slope have 7 model columns; study small allows at most 5",
    )


# ----------------------------------------------------------------------------- event loop


def test_a_slow_validation_does_not_stall_the_event_loop(served: Served) -> None:
    served.studies.delay = 3.0
    slow = threading.Thread(target=submit, args=(served, b'{"analysis": "count"}'))
    slow.start()
    try:
        time.sleep(0.5)  # the slow request is now inside its validation
        started = time.perf_counter()
        health = httpx.get(f"{served.url}/api/health", timeout=30)
        took = time.perf_counter() - started
    finally:
        slow.join(timeout=30)
    assert health.status_code == 200
    assert took < 0.5, f"a health check waited {took:.2f} s behind a validation"
