"""The REPL server that runs *inside* the sandbox (one process per session; see mtpo.agent.sandbox).

It is not imported by the parent: the parent reads this file's source and starts it with
`python -s -u -B -c SOURCE CTL_FD CONFIG`, because the project tree is not visible inside the
sandbox. Standard library only, and only cheap modules at start-up (session start is on the hot path).

Protocol: a frame is a 4-byte big-endian length and that many bytes; code is never pasted into a
string, so it runs exactly as written (quotes, backslashes, "\\frac").
- requests arrive on the original stdin (moved to a private fd; fd 0 becomes /dev/null, so `input()`
  gets EOF): one frame = the cell's source, UTF-8;
- replies go to CTL_FD, one frame each: a status byte and UTF-8 text. b"R" ready; b"F" + message: the
  limits could not be set; per cell, after stdout/stderr were flushed: b"O" ok, or b"E" + error line;
- the cell's stdout and stderr are fds 1 and 2, a pipe the parent reads while the cell runs.
"""

import _ast
import os
import resource
import sys

MAIN_PID = os.getpid()


def _set_limits(cfg):
    mb = 1024 * 1024
    limits = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, cfg["max_procs"]),
              (resource.RLIMIT_NOFILE, cfg["max_open_files"]),
              (resource.RLIMIT_AS, cfg["memory_mb"] and cfg["memory_mb"] * mb),
              (resource.RLIMIT_FSIZE, cfg["max_file_mb"] and cfg["max_file_mb"] * mb)]
    for which, value in limits:
        if value:  # soft = hard: the cell cannot raise them again
            resource.setrlimit(which, (value, value))


def _install_seccomp(program):
    """Only in isolation='rlimits' (bwrap installs the same filter itself via --seccomp)."""
    import ctypes

    buf = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program) // 8, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0 or \
            libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")


def _set_cpu_budget(cpu_s):
    """RLIMIT_CPU is per process and cumulative: move the soft limit to (CPU used so far + budget), in
    whole seconds. Past it the kernel sends SIGXCPU, whose default action kills the process (the parent
    reports a timeout)."""
    if cpu_s is None:
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = -int(-(usage.ru_utime + usage.ru_stime + cpu_s) // 1)  # ceil
    resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.RLIM_INFINITY))


def _error_line(exc):
    """The traceback's last line, e.g. "NameError: name 'x' is not defined" (the paper's format)."""
    import traceback  # lazily: it costs start-up time and most cells do not fail

    lines = traceback.format_exception_only(type(exc), exc)
    line = lines[-1].strip() if lines else type(exc).__name__
    # a huge message must not make a huge reply frame (the parent treats > 1 MiB as a broken session)
    return line if len(line) <= 20000 else f"{line[:10000]} ... {line[-10000:]}"


def run_cell(code, namespace):
    """Execute one cell; print the repr of a bare last expression like a notebook. Returns the error
    line or None."""
    try:
        tree = compile(code, "<cell>", "exec", _ast.PyCF_ONLY_AST)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], _ast.Expr) else None
        exec(compile(tree, "<cell>", "exec"), namespace)
        if last is not None:
            value = eval(compile(_ast.Expression(last.value), "<cell>", "eval"), namespace)
            if value is not None:
                namespace["_"] = value
                print(repr(value))
        return None
    except BaseException as exc:  # SystemExit and KeyboardInterrupt are errors of the cell too
        return _error_line(exc)
    finally:
        if os.getpid() != MAIN_PID:  # a forked child (allow_subprocess) finished the cell: never reply
            os._exit(0)


def _read_exact(fd, n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _send(fd, status, text=""):
    data = status + text.encode("utf-8", "replace")
    view = memoryview(len(data).to_bytes(4, "big") + data)
    while view:
        view = view[os.write(fd, view):]


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def main():
    ctl_fd, cfg = int(sys.argv[1]), eval(sys.argv[2], {"__builtins__": {}})  # a dict literal of the parent's
    req_fd = os.dup(0)
    os.set_inheritable(req_fd, False)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        _set_limits(cfg)
        if cfg["seccomp"]:
            _install_seccomp(bytes.fromhex(cfg["seccomp"]))
    except Exception as exc:
        _send(ctl_fd, b"F", _error_line(exc))
        return
    if cfg["seed"] is not None:  # the model's unseeded `random` draws repeat from run to run
        import random
        random.seed(cfg["seed"])
    _send(ctl_fd, b"R")
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    del sys.argv[1:]
    while True:
        try:
            code = _read_exact(req_fd, int.from_bytes(_read_exact(req_fd, 4), "big")).decode("utf-8", "surrogatepass")
        except EOFError:
            return
        _set_cpu_budget(cfg["cpu_s"])
        error = run_cell(code, namespace)
        _flush()
        _send(ctl_fd, b"O") if error is None else _send(ctl_fd, b"E", error)


if __name__ == "__main__":
    main()
