"""The sandbox's child process: runs ONE function of a researcher's script, locked down.

Started by :mod:`analyses.sandbox` as ``python -I -B <this file>``; it imports nothing from the
project, so the script cannot reach the site's code or configuration through it. Order:

1. import numpy and pandas (and the modules they load lazily), while files may still be read;
2. read the job (pickled by the trusted parent) from stdin: the function, the script's source,
   and a data frame or the pooled totals;
3. lock down, each layer on its own (the parent learns which applied):
   resource limits (address space, CPU seconds, file size, open files); a new network
   namespace; Landlock (reads only under Python's own install and the system libraries, no
   writes, no TCP, no signals to other processes); a seccomp filter (no sockets, no fork or
   exec, no ptrace, no io_uring, no namespaces); and an audit hook that stops the script, with a
   category, at the first socket, file, subprocess, ctypes or fork event;
4. run the script's function and write its output to a private pipe: a NumPy array (``.npy``,
   no pickle) or a JSON object.

Exit codes name the reason a script was stopped (see ``STOPPED``); the parent maps them, and
signals (SIGXCPU: CPU seconds; SIGKILL: wall time; SIGSYS: a system call seccomp forbids).
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import pickle
import platform
import resource
import struct
import sys
from typing import Any

# Exit codes: the reason the audit hook (or the harness) stopped the script.
STOPPED = {
    "network": 40,
    "file": 41,
    "import": 42,
    "process": 43,
    "memory": 44,
    "error": 45,
    "output": 46,
}
#: Modules nothing may import once the script runs, whoever asks: networking, processes, ctypes.
HARD_FORBIDDEN = frozenset(
    {
        "ctypes",
        "_ctypes",
        "subprocess",
        "_posixsubprocess",
        "socket",
        "_socket",
        "ssl",
        "_ssl",
        "select",
        "selectors",
        "multiprocessing",
        "_multiprocessing",
        "concurrent",
        "asyncio",
        "http",
        "urllib",
        "ftplib",
        "smtplib",
        "mmap",
        "pty",
        "sqlite3",
        "_sqlite3",
    }
)
EVENT_CATEGORIES = (
    ("socket.", "network"),
    ("open", "file"),
    ("os.listdir", "file"),
    ("os.scandir", "file"),
    ("os.remove", "file"),
    ("os.rename", "file"),
    ("os.mkdir", "file"),
    ("os.chdir", "file"),
    ("os.truncate", "file"),
    ("shutil.", "file"),
    ("os.system", "process"),
    ("os.exec", "process"),
    ("os.posix_spawn", "process"),
    ("os.spawn", "process"),
    ("os.fork", "process"),
    ("os.forkpty", "process"),
    ("os.kill", "process"),
    ("os.killpg", "process"),
    ("subprocess.", "process"),
    ("_posixsubprocess.", "process"),
    ("ctypes.", "process"),
    ("sys.setprofile", "process"),
    ("sys.settrace", "process"),
    ("code.__new__", "process"),
    ("marshal.loads", "process"),
    ("pickle.find_class", "process"),
    ("sys.addaudithook", "process"),
    ("compile", "process"),
    ("exec", "process"),
)
#: Modules a script may import (already loaded, or pure computation from the standard library).
ALLOWED_IMPORTS = frozenset(
    {
        "math",
        "cmath",
        "statistics",
        "itertools",
        "functools",
        "operator",
        "collections",
        "numbers",
        "decimal",
        "fractions",
        "typing",
        "dataclasses",
        "enum",
        "re",
        "string",
        "bisect",
        "heapq",
        "copy",
        "abc",
        "numpy",
        "pandas",
        "__future__",
    }
)

# Linux constants (x86_64 and aarch64 share the generic values used here).
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_THREAD = 0x00010000
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
EPERM = 1
ENOSYS = 38
AUDIT_ARCH_X86_64 = 0xC000003E
# x86_64 system call numbers: sockets, process creation, tracing, namespaces, kernel escapes.
X86_64_DENIED = {
    41: "socket",
    42: "connect",
    43: "accept",
    49: "bind",
    50: "listen",
    53: "socketpair",
    288: "accept4",
    57: "fork",
    58: "vfork",
    59: "execve",
    322: "execveat",
    62: "kill",
    200: "tkill",
    101: "ptrace",
    310: "process_vm_readv",
    311: "process_vm_writev",
    272: "unshare",
    308: "setns",
    165: "mount",
    166: "umount2",
    155: "pivot_root",
    161: "chroot",
    321: "bpf",
    175: "init_module",
    313: "finit_module",
    246: "kexec_load",
    169: "reboot",
    298: "perf_event_open",
    323: "userfaultfd",
    425: "io_uring_setup",
    426: "io_uring_enter",
    427: "io_uring_register",
    248: "add_key",
    250: "keyctl",
    434: "pidfd_open",
    424: "pidfd_send_signal",
}
NR_CLONE = 56
NR_CLONE3 = 435
NR_TGKILL = 234

_libc = ctypes.CDLL(None, use_errno=True)


def _write_frame(out: io.BufferedWriter, kind: bytes, body: bytes) -> None:
    out.write(kind + struct.pack("<Q", len(body)) + body)
    out.flush()


def _limits(job: dict[str, Any]) -> None:
    """Address space: what the process holds now plus the script's allowance."""
    with open("/proc/self/status", encoding="ascii") as status:
        vm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    memory = vm_kib * 1024 + int(job["memory_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    used = resource.getrusage(resource.RUSAGE_SELF)
    spent = int(used.ru_utime + used.ru_stime) + 1
    cpu = spent + int(job["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _network_namespace() -> str:
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    if _libc.unshare(flags) != 0:
        return f"unavailable ({os.strerror(ctypes.get_errno())})"
    return "applied"


def _landlock(readable: list[str]) -> str:
    syscall = _libc.syscall
    syscall.restype = ctypes.c_long
    abi = syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return f"unavailable ({os.strerror(ctypes.get_errno())})"
    fs = (1 << 13) - 1  # execute .. make_sym (ABI 1)
    if abi >= 2:
        fs |= 1 << 13  # refer
    if abi >= 3:
        fs |= 1 << 14  # truncate
    if abi >= 5:
        fs |= 1 << 15  # ioctl_dev
    net = 0b11 if abi >= 4 else 0  # bind_tcp, connect_tcp
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets, signals
    attr = struct.pack("<QQQ", fs, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    buf = ctypes.create_string_buffer(attr[:size], size)
    ruleset = syscall(444, buf, ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return f"unavailable ({os.strerror(ctypes.get_errno())})"
    read = (1 << 0) | (1 << 2) | (1 << 3)  # execute, read_file, read_dir
    for path in readable:
        try:
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        rule = ctypes.create_string_buffer(struct.pack("<Qi", read, fd), 12)
        syscall(445, ctypes.c_int(ruleset), ctypes.c_int(1), rule, ctypes.c_uint32(0))
        os.close(fd)
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return f"unavailable ({os.strerror(ctypes.get_errno())})"
    if syscall(446, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
        return f"unavailable ({os.strerror(ctypes.get_errno())})"
    os.close(ruleset)
    return f"applied (ABI {abi})"


def _seccomp() -> str:
    if platform.machine() != "x86_64":
        return f"unavailable (no filter for {platform.machine()})"

    def ins(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("<HBBI", code, jt, jf, k)

    ld_w_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    deny = SECCOMP_RET_ERRNO | EPERM
    prog = [
        ins(ld_w_abs, 0, 0, 4),  # arch
        ins(jeq, 1, 0, AUDIT_ARCH_X86_64),
        ins(ret, 0, 0, SECCOMP_RET_KILL_PROCESS),
        ins(ld_w_abs, 0, 0, 0),  # syscall number
        ins(jge, 0, 1, 0x40000000),  # the x32 ABI
        ins(ret, 0, 0, SECCOMP_RET_KILL_PROCESS),
    ]
    for nr in [*sorted(X86_64_DENIED), NR_TGKILL]:
        prog += [ins(jeq, 0, 1, nr), ins(ret, 0, 0, deny)]
    # clone3's flags sit behind a pointer a filter cannot read: ENOSYS makes libc use clone.
    prog += [ins(jeq, 0, 1, NR_CLONE3), ins(ret, 0, 0, SECCOMP_RET_ERRNO | ENOSYS)]
    # clone: threads (CLONE_THREAD) only, never a new process.
    prog += [
        ins(jeq, 0, 3, NR_CLONE),
        ins(ld_w_abs, 0, 0, 16),  # args[0], low half: the flags
        ins(jset, 1, 0, CLONE_THREAD),
        ins(ret, 0, 0, deny),
        ins(ret, 0, 0, SECCOMP_RET_ALLOW),
    ]
    code = b"".join(prog)
    filters = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("<HxxxxxxQ", len(prog), ctypes.addressof(filters))
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return f"unavailable ({os.strerror(ctypes.get_errno())})"
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fbuf, 0, 0) != 0:
        return f"unavailable ({os.strerror(ctypes.get_errno())})"
    return "applied"


def _stop(category: str, what: str) -> None:
    """Leave at once: the script cannot catch an exit."""
    try:
        os.write(2, f"\nALLIANCE-SANDBOX-STOP {category}: {what}\n".encode(errors="replace"))
    finally:
        os._exit(STOPPED[category])


def _from_script(filename: str) -> bool:
    """Whether the code that raised the event is the script's own (not a library it called):
    the first frame outside the import machinery and this harness."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith("<frozen importlib") and name != __file__:
            return name == filename
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _audit_hook_for(filename: str, readable: tuple[str, ...]) -> Any:
    """The hook: the script's own imports only from ``ALLOWED_IMPORTS``; no library import of a
    networking, process or ctypes module; no socket, subprocess, fork or ctypes event; files
    only read by libraries, under Python's install."""

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "import":
            name = str(args[0]) if args else ""
            top = name.split(".")[0]
            if top in HARD_FORBIDDEN or (_from_script(filename) and (top not in ALLOWED_IMPORTS)):
                _stop("import", f"import {name}")
            return
        if event in ("open", "os.listdir", "os.scandir"):
            path = str(args[0]) if args else ""
            mode = str(args[1]) if event == "open" and len(args) > 1 and args[1] else "r"
            library_read = (
                not _from_script(filename)
                and not any(c in mode for c in "wax+")
                and os.path.realpath(path).startswith(readable)
            )
            if not library_read:
                _stop("file", f"{event} {path!r}"[:200])
            return
        if event in ("compile", "exec") and not _from_script(filename):
            return
        for prefix, category in EVENT_CATEGORIES:
            if event == prefix or (prefix.endswith(".") and event.startswith(prefix)):
                _stop(category, f"{event}"[:200])
            if prefix in ("os.exec", "os.spawn", "os.fork") and event.startswith(prefix):
                _stop(category, event)

    return hook


def _readable_roots() -> list[str]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, "/usr/lib", "/lib", "/usr/lib64"}
    for entry in sys.path:
        if entry and any(entry.startswith(r) for r in (sys.prefix, sys.base_prefix)):
            roots.add(entry)
    return sorted(r for r in roots if os.path.isdir(r))


def main() -> None:
    # The private output pipe: fd 1 as it was started; the script's own prints go nowhere.
    out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - kept open for the script's prints
    import numpy as np
    import pandas as pd

    # Modules numpy and pandas load lazily, loaded while files may still be read.
    import pandas.core.groupby
    import pandas.core.reshape.pivot

    job = pickle.loads(sys.stdin.buffer.read())
    readable = _readable_roots()
    layers = {"limits": "applied"}
    try:
        _limits(job)
    except (OSError, ValueError) as exc:
        layers["limits"] = f"unavailable ({exc})"
    layers["network namespace"] = _network_namespace()
    layers["landlock"] = _landlock(readable)
    layers["seccomp"] = _seccomp()
    layers["audit hook"] = "applied" if job.get("audit_hook", True) else "left out (a test)"
    _write_frame(out, b"L", json.dumps(layers).encode())
    namespace: dict[str, Any] = {"__name__": "alliance_script", "np": np, "pd": pd}
    for loaded in [m for m in sys.modules if m.split(".")[0] in HARD_FORBIDDEN]:
        del sys.modules[loaded]  # a fresh import of any of them raises an audit event
    if job.get("audit_hook", True):
        sys.addaudithook(_audit_hook_for(job["filename"], tuple(readable)))
    try:
        code = compile(job["source"], job["filename"], "exec")
        exec(code, namespace)
        function: Any = namespace.get(job["function"])
        if not callable(function):
            _stop("error", f"the script defines no function {job['function']}")
            return
        # Iterative scripts also get the round's public state (a dict of numbers and lists).
        state = () if job.get("state") is None else (job["state"],)
        if job["function"] == "per_record":
            value = function(job["frame"], *state)
            array = np.asarray(value)
            if array.dtype == object or not (
                np.issubdtype(array.dtype, np.number) or array.dtype == bool
            ):
                _stop("output", f"per_record returned dtype {array.dtype}")
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(array, dtype=np.float64), allow_pickle=False)
            _write_frame(out, b"A", buffer.getvalue())
        else:
            value = function(job["total"], job["n"], *state)
            _write_frame(out, b"J", json.dumps(value, allow_nan=True, default=_plain).encode())
    except MemoryError:
        _stop("memory", "MemoryError")
    except RecursionError:
        _stop("error", "RecursionError")
    except Exception as exc:  # the detail goes to the site's log only
        _stop("error", f"{type(exc).__name__}: {exc}"[:500])
    out.close()
    os._exit(0)


def _plain(value: Any) -> Any:
    """NumPy scalars and arrays as JSON numbers and lists."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"combine returned a {type(value).__name__}, which is not a number or list")


def zygote(control_fd: int) -> None:
    """Fork server: import numpy and pandas once, then fork one locked-down child per job.

    Each job arrives as one message on the control socket with three descriptors (the child's
    stdin, stdout and stderr pipes, which the parent holds the other ends of, so the job's data
    never passes through here). The reply is the child's pid, then its exit status (negative: a
    signal). One job at a time; the parent starts a fresh process when this one is busy.
    """
    import socket

    import numpy  # noqa: F401 - what every child would import, imported once
    import pandas
    import pandas.core.groupby
    import pandas.core.reshape.pivot  # noqa: F401

    control = socket.socket(fileno=control_fd)
    control.sendall(b"R")  # ready
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 16, 3)
        except OSError:
            return
        if not message or len(fds) != 3:
            return
        pid = os.fork()
        if pid == 0:  # the child: its own session, the job's pipes as 0, 1 and 2
            try:
                control.close()
                os.setsid()
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.close(fd)
                main()
            finally:
                os._exit(STOPPED["error"])
        for fd in fds:
            os.close(fd)
        control.sendall(struct.pack("<q", pid))
        _, status = os.waitpid(pid, 0)
        control.sendall(struct.pack("<q", os.waitstatus_to_exitcode(status)))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--zygote":
        zygote(int(sys.argv[2]))
    else:
        main()
