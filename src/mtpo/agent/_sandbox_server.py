"""The REPL server that runs *inside* the sandbox (one process per session; see mtpo.agent.sandbox).

It is not imported by the parent: the parent reads this file's source and starts it with
`python -I -u -B -c SOURCE CTL_FD CONFIG_JSON`, because the project tree is not visible inside the
sandbox. Standard library only; no mtpo imports.

Protocol (length-prefixed JSON, so code is never pasted into a string and runs exactly as written):
a frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON.
- requests arrive on the original stdin (moved to a private fd; fd 0 becomes /dev/null, so `input()`
  gets EOF): ``{"code": str}``;
- replies go to CTL_FD: first ``{"ready": true}`` (or ``{"ready": false, "error": ...}``), then one
  ``{"error": str | null}`` per cell, written after stdout/stderr were flushed;
- the cell's stdout and stderr are the process's fds 1 and 2, a pipe the parent reads while the cell runs.
"""

import ast
import json
import math
import os
import platform
import resource
import struct
import sys
import traceback

MAIN_PID = os.getpid()

# seccomp: refuse new processes (clone without CLONE_THREAD, fork, vfork; clone3 -> ENOSYS so libc
# falls back to clone for threads). Syscall numbers per architecture (AUDIT_ARCH value, numbers).
_ARCHES = {
    "x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435}),
    "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435}),
}
_CLONE_THREAD = 0x00010000
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_EPERM, _ENOSYS = 1, 38


def _bpf(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)


def _no_process_filter():
    """A seccomp-BPF program (bytes) that lets threads be created but not processes."""
    machine = platform.machine()
    if machine not in _ARCHES:
        raise OSError(f"no seccomp syscall table for architecture {machine!r}")
    arch, nr = _ARCHES[machine]
    ld_w_abs, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06
    deny, nosys = _RET_ERRNO | _EPERM, _RET_ERRNO | _ENOSYS
    prog = [_bpf(ld_w_abs, 0, 0, 4), _bpf(jeq, 1, 0, arch), _bpf(ret, 0, 0, deny),  # foreign ABI
            _bpf(ld_w_abs, 0, 0, 0)]
    if machine == "x86_64":  # the x32 ABI reuses the arch value with bit 30 set in the number
        prog += [_bpf(jset, 0, 1, 0x40000000), _bpf(ret, 0, 0, deny)]
    for name in ("fork", "vfork"):
        if name in nr:
            prog += [_bpf(jeq, 0, 1, nr[name]), _bpf(ret, 0, 0, deny)]
    prog += [_bpf(jeq, 0, 1, nr["clone3"]), _bpf(ret, 0, 0, nosys),
             _bpf(jeq, 1, 0, nr["clone"]), _bpf(ret, 0, 0, _RET_ALLOW),
             _bpf(ld_w_abs, 0, 0, 16),  # low 32 bits of args[0] (flags), little-endian
             _bpf(jset, 0, 1, _CLONE_THREAD), _bpf(ret, 0, 0, _RET_ALLOW), _bpf(ret, 0, 0, deny)]
    return b"".join(prog)


def _install_no_process_filter():
    import ctypes

    prog = _no_process_filter()
    buf = ctypes.create_string_buffer(prog, len(prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog) // 8, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0 or \
            libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")


def _set_limits(cfg):
    def cap(which, value):
        if value is not None:
            resource.setrlimit(which, (value, value))

    mb = 1024 * 1024
    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_AS, cfg["memory_mb"] * mb if cfg["memory_mb"] else None)
    cap(resource.RLIMIT_FSIZE, cfg["max_file_mb"] * mb if cfg["max_file_mb"] else None)
    cap(resource.RLIMIT_NPROC, cfg["max_procs"])
    cap(resource.RLIMIT_NOFILE, cfg["max_open_files"])


def _set_cpu_budget(cpu_s):
    """RLIMIT_CPU is per process and cumulative: move the soft limit to (CPU used so far + budget).
    Past it the kernel sends SIGXCPU, whose default action kills the process (reported as a timeout)."""
    if cpu_s is None:
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime + cpu_s)  # whole seconds: cpu_s to cpu_s + 1 more
    resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.RLIM_INFINITY))


def _error_line(exc):
    """The traceback's last line, e.g. "NameError: name 'x' is not defined" (the paper's format)."""
    lines = traceback.format_exception_only(type(exc), exc)
    return lines[-1].strip() if lines else type(exc).__name__


def run_cell(code, namespace):
    """Execute one cell; print the repr of a bare last expression like a notebook. Returns the error
    line or None."""
    try:
        tree = ast.parse(code, "<cell>", "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<cell>", "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
            if value is not None:
                namespace["_"] = value
                print(repr(value))
        return None
    except BaseException as exc:  # SystemExit and KeyboardInterrupt are errors of the cell too
        return _error_line(exc)
    finally:
        if os.getpid() != MAIN_PID:  # a forked child finished the cell: it must never reply
            os._exit(0)


def _read_exact(fd, n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _send(fd, obj):
    data = json.dumps(obj).encode()
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def main():
    ctl_fd, cfg = int(sys.argv[1]), json.loads(sys.argv[2])
    req_fd = os.dup(0)
    os.set_inheritable(req_fd, False)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        _set_limits(cfg)
        if not cfg["allow_subprocess"]:
            _install_no_process_filter()
    except Exception as exc:
        _send(ctl_fd, {"ready": False, "error": _error_line(exc)})
        return
    if cfg["seed"] is not None:  # the model's unseeded `random` draws repeat from run to run
        import random
        random.seed(cfg["seed"])
    _send(ctl_fd, {"ready": True})
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    del sys.argv[1:]
    while True:
        try:
            (size,) = struct.unpack(">I", _read_exact(req_fd, 4))
            request = json.loads(_read_exact(req_fd, size))
        except EOFError:
            return
        _set_cpu_budget(cfg["cpu_s"])
        error = run_cell(request["code"], namespace)
        _flush()
        _send(ctl_fd, {"error": error})


if __name__ == "__main__":
    main()
