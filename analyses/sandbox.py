"""Run one function of a researcher's script in a locked-down child process.

The child (:mod:`analyses._sandbox_child`) gets its input through a pipe, never a file: at a
site, the study's variables for the filtered, consented rows; at the coordinator, the pooled
totals. It has no network (a network namespace, Landlock, seccomp, an audit hook), no files
beyond Python's own install (Landlock, the audit hook), no processes (seccomp, the audit hook),
and limits on memory, CPU seconds and wall time. Its output is read with a cap and validated:
an ``.npy`` array (never a pickle) or a JSON object. ``docs/threat-model.md`` says what this
stops and what it does not.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import math
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from protocol.errors import RefusedError

log = logging.getLogger("alliance.sandbox")

CHILD = Path(__file__).with_name("_sandbox_child.py")
#: The child's exit codes (see ``_sandbox_child.STOPPED``) and what each means, in fixed words:
#: a reason never holds the script's own text, which could carry data.
REASONS = {
    40: ("network", "tried to use the network"),
    41: ("file", "tried to open a file"),
    42: ("import", "imported a module scripts may not use"),
    43: ("process", "tried to start or signal a process, or to use ctypes"),
    44: ("memory", "ran out of its memory allowance"),
    45: ("error", "raised an error"),
    46: ("output", "returned something other than numbers"),
}
SIGNALS: dict[int, tuple[str, str]] = {
    int(signal.SIGXCPU): ("cpu", "used more than its CPU seconds"),
    int(signal.SIGSYS): ("process", "made a system call scripts may not make"),
    int(signal.SIGSEGV): ("error", "crashed"),
    int(signal.SIGABRT): ("error", "crashed"),
}
#: Largest combine result (JSON bytes): a result is a handful of estimates.
MAX_RESULT_BYTES = 1 << 20


@dataclass(frozen=True)
class SandboxLimits:
    """What a script may use per call.

    Attributes:
        cpu_seconds: CPU time of the script's function (the child's start-up not counted).
        memory_mb: memory the function may allocate above what the child holds at start.
        wall_seconds: wall time of the whole call, start-up included.
    """

    cpu_seconds: int = 30
    memory_mb: int = 1024
    wall_seconds: float = 60.0

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "memory_mb", "wall_seconds"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"sandbox {name} must be a number above 0, got {value!r}")


class ScriptStopped(RefusedError):
    """The sandbox stopped a script. ``category`` is one of network, file, import, process,
    memory, cpu, wall, error, output; ``detail`` (for the site's own log, never a reply) may
    hold what the script printed or raised."""

    def __init__(self, script: str, category: str, what: str, detail: str = "") -> None:
        super().__init__(f"the sandbox stopped script {script}: it {what}", code="script")
        self.category = category
        self.detail = detail


@dataclass
class SandboxRun:
    """One call's output and how the child was isolated."""

    value: Any
    layers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _read_capped(stream: Any, cap: int, into: list[bytes], over: threading.Event) -> None:
    total = 0
    while chunk := stream.read(65536):
        total += len(chunk)
        if total > cap:
            over.set()
            break
        into.append(chunk)
    stream.close()


def _frames(data: bytes) -> dict[bytes, bytes]:
    """The child's output frames: kind (one byte), length (8 bytes), body."""
    frames: dict[bytes, bytes] = {}
    at = 0
    while at + 9 <= len(data):
        kind = data[at : at + 1]
        (size,) = struct.unpack("<Q", data[at + 1 : at + 9])
        body = data[at + 9 : at + 9 + size]
        if len(body) != size or kind in frames:
            break
        frames[kind] = body
        at += 9 + size
    return frames


def _environment() -> dict[str, str]:
    """Nothing of the parent's environment (tokens, database URLs) reaches the script."""
    return {
        "PATH": "/usr/bin:/bin",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
        "LC_ALL": "C.UTF-8",
    }


def run_function(
    script: str,
    source: str,
    function: str,
    limits: SandboxLimits,
    frame: pd.DataFrame | None = None,
    total: npt.NDArray[np.float64] | None = None,
    n: float = 0.0,
    output_cap: int = MAX_RESULT_BYTES,
    warm: bool = True,
    audit_hook: bool = True,
    state: dict[str, Any] | None = None,
) -> SandboxRun:
    """Run ``function`` of a script's ``source`` in the sandbox.

    Args:
        script: how reasons name the script ("'wmean' 1.0 (sha256 1a2b3c4d)").
        source: the module's text.
        function: ``per_record`` (given ``frame``) or ``combine`` (given ``total`` and ``n``).
        limits: CPU, memory and wall time.
        output_cap: most bytes the child may write back.
        warm: fork the child from the warm fork server when it is free (False: always start a
            fresh interpreter; the isolation is the same, only slower).
        audit_hook: False leaves the audit hook out, so that tests can show the kernel's
            layers (seccomp, Landlock, the network namespace) hold on their own.
        state: an iterative script's public round state, passed as the function's last
            argument (None: single-round scripts, called without it).

    Returns:
        per_record: a float64 array; combine: the decoded JSON value.

    Raises:
        ScriptStopped: with a category and fixed words (and the child's detail for the log).
    """
    job = {
        "function": function,
        "source": source,
        "filename": f"<script {script}>",
        "frame": frame,
        "total": None if total is None else np.array(total, dtype=np.float64),
        "n": float(n),
        "state": None if state is None else dict(state),
        "memory_bytes": int(limits.memory_mb) << 20,
        "cpu_seconds": int(limits.cpu_seconds),
        "audit_hook": bool(audit_hook),
    }
    payload = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
    started = time.perf_counter()
    child = _run_child(payload, limits.wall_seconds, output_cap, warm)
    seconds = time.perf_counter() - started
    frames = _frames(child.out)
    layers = _layers(frames.get(b"L"))
    _raise_if_stopped(script, child, limits)
    if function == "per_record":
        body = frames.get(b"A")
        if body is None:
            raise ScriptStopped(script, "output", "returned nothing", child.err)
        try:
            array = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError):
            raise ScriptStopped(script, "output", "returned a malformed array", child.err) from None
        return SandboxRun(np.asarray(array, dtype=np.float64), layers, seconds)
    body = frames.get(b"J")
    if body is None:
        raise ScriptStopped(script, "output", "returned nothing", child.err)
    try:
        value = json.loads(body)
    except ValueError:
        raise ScriptStopped(script, "output", "returned malformed JSON", child.err) from None
    return SandboxRun(value, layers, seconds)


@dataclass(frozen=True)
class _Finished:
    """How the child ended: its exit status (negative: a signal), output and error text."""

    returncode: int
    out: bytes
    err: str
    timed_out: bool
    too_much: bool


class _Zygote:
    """A warm fork server (``_sandbox_child.zygote``): a fresh child per job without paying
    Python's and pandas' start-up (about 2 s on a small machine) each time. One job at a time;
    a caller that finds it busy starts a cold child instead."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._empty: tempfile.TemporaryDirectory[str] | None = None

    def _start(self) -> socket.socket:
        if self._process is not None and self._process.poll() is None and self._control:
            return self._control
        self.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._empty = tempfile.TemporaryDirectory(prefix="alliance-sandbox-")
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-B", str(CHILD), "--zygote", str(theirs.fileno())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self._empty.name,
            env=_environment(),
            start_new_session=True,
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        ours.settimeout(ZYGOTE_START_SECONDS)
        if ours.recv(1) != b"R":
            raise OSError("the sandbox's fork server did not start")
        self._control = ours
        return ours

    def close(self) -> None:
        """Stop the fork server (its next use starts another)."""
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            self._process = None
        if self._empty is not None:
            self._empty.cleanup()
            self._empty = None

    def run(self, payload: bytes, wall_seconds: float, output_cap: int) -> _Finished | None:
        """Run one job through the fork server; None when it is busy or cannot start."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            try:
                control = self._start()
            except OSError:
                log.warning("the sandbox's fork server would not start; using a fresh process")
                self.close()
                return None
            return self._job(control, payload, wall_seconds, output_cap)
        except (OSError, struct.error):
            log.exception("the sandbox's fork server failed; it restarts at the next job")
            self.close()
            raise
        finally:
            self._lock.release()

    def _job(
        self, control: socket.socket, payload: bytes, wall_seconds: float, output_cap: int
    ) -> _Finished:
        started = time.perf_counter()
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        try:
            socket.send_fds(control, [b"j"], [stdin_r, stdout_w, stderr_w])
        finally:
            for fd in (stdin_r, stdout_w, stderr_w):
                os.close(fd)
        control.settimeout(ZYGOTE_START_SECONDS)
        (pid,) = struct.unpack("<q", _recv_exactly(control, 8))
        out: list[bytes] = []
        err: list[bytes] = []
        over = threading.Event()
        readers = _readers(
            os.fdopen(stdout_r, "rb"), os.fdopen(stderr_r, "rb"), output_cap, out, err, over
        )
        with contextlib.suppress(BrokenPipeError), os.fdopen(stdin_w, "wb") as feed:
            feed.write(payload)
        code: int | None = None
        timed_out = False
        while code is None:
            left = started + wall_seconds - time.perf_counter()
            if over.is_set() or left <= 0:
                timed_out = not over.is_set()
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                control.settimeout(ZYGOTE_START_SECONDS)
                (code,) = struct.unpack("<q", _recv_exactly(control, 8))
                break
            control.settimeout(min(left, 0.25))
            try:
                (code,) = struct.unpack("<q", _recv_exactly(control, 8))
            except TimeoutError:
                continue
        for reader in readers:
            reader.join(timeout=5)
        return _Finished(
            int(code),
            b"".join(out),
            b"".join(err).decode(errors="replace")[-2000:],
            timed_out,
            over.is_set(),
        )


def _recv_exactly(control: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = control.recv(size - len(data))
        if not chunk:
            raise OSError("the sandbox's fork server closed its socket")
        data += chunk
    return data


def _readers(
    stdout: Any,
    stderr: Any,
    output_cap: int,
    out: list[bytes],
    err: list[bytes],
    over: threading.Event,
) -> list[threading.Thread]:
    """Threads that read a child's output (capped: past it, ``over`` is set) and errors."""
    readers = [
        threading.Thread(
            target=_read_capped, args=(stdout, output_cap + 4096, out, over), daemon=True
        ),
        threading.Thread(
            target=_read_capped, args=(stderr, 1 << 16, err, threading.Event()), daemon=True
        ),
    ]
    for reader in readers:
        reader.start()
    return readers


ZYGOTE_START_SECONDS = 60.0
_ZYGOTE = _Zygote()
atexit.register(_ZYGOTE.close)


def _run_child(payload: bytes, wall_seconds: float, output_cap: int, warm: bool) -> _Finished:
    """Run the job in a fresh child: forked by the warm fork server when it is free (and
    ``warm``), else started cold in an empty folder with a bare environment. Wait at most
    ``wall_seconds``, reading its output with a cap (killed past either)."""
    found = _ZYGOTE.run(payload, wall_seconds, output_cap) if warm else None
    return found if found is not None else _run_cold(payload, wall_seconds, output_cap)


def _run_cold(payload: bytes, wall_seconds: float, output_cap: int) -> _Finished:
    """Start the child in an empty folder with a bare environment (see ``_run_child``)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alliance-sandbox-") as empty:
        child = subprocess.Popen(
            [sys.executable, "-I", "-B", str(CHILD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=empty,
            env=_environment(),
            start_new_session=True,
            close_fds=True,
        )
        out: list[bytes] = []
        err: list[bytes] = []
        over = threading.Event()
        readers = _readers(child.stdout, child.stderr, output_cap, out, err, over)
        timed_out = False
        try:
            assert child.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                child.stdin.write(payload)
                child.stdin.close()
            deadline = started + wall_seconds
            while child.poll() is None:
                if over.is_set() or time.perf_counter() > deadline:
                    timed_out = not over.is_set()
                    break
                time.sleep(0.005)
        finally:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            for reader in readers:
                reader.join(timeout=5)
    return _Finished(
        child.returncode,
        b"".join(out),
        b"".join(err).decode(errors="replace")[-2000:],
        timed_out,
        over.is_set(),
    )


def _raise_if_stopped(script: str, child: _Finished, limits: SandboxLimits) -> None:
    """Raise :class:`ScriptStopped` in fixed words when the child did not end cleanly."""
    if child.timed_out:
        raise ScriptStopped(script, "wall", f"ran longer than {limits.wall_seconds:g} s", child.err)
    if child.too_much:
        raise ScriptStopped(
            script, "output", "wrote more output than its result may hold", child.err
        )
    code = child.returncode
    if code == 0:
        return
    if code < 0:
        category, what = SIGNALS.get(-code, ("error", f"was killed by signal {-code}"))
    else:
        category, what = REASONS.get(code, ("error", f"exited with status {code}"))
    if category == "cpu":
        what = f"used more than {limits.cpu_seconds} CPU seconds"
    if category == "memory":
        what = f"used more than its {limits.memory_mb} MB of memory"
    raise ScriptStopped(script, category, what, child.err)


def _layers(body: bytes | None) -> dict[str, str]:
    if body is None:
        return {}
    try:
        found = json.loads(body)
    except ValueError:
        return {}
    if not isinstance(found, dict):
        return {}
    return {str(k)[:40]: str(v)[:80] for k, v in list(found.items())[:8]}


def isolation_layers() -> dict[str, str]:
    """Which isolation layers the sandbox applies on this machine (a probe run)."""
    probe = "def combine(total, n):\n    return {'ok': 1.0}\n"
    run = run_function("probe", probe, "combine", SandboxLimits(wall_seconds=60), n=0.0)
    log.debug("sandbox layers: %s", run.layers)
    return run.layers
