"""math-verify in worker processes: safe from any thread, with a timeout that always works.

math-verify 0.9.0 times out with SIGALRM, which only works in the main thread of the main
interpreter, and its `TimeoutException` is a BaseException that escapes `except Exception`. A rollout
grades answers from worker threads, and sympy can hang inside C code (big integer powers) where no
signal is delivered. So the comparison runs in small persistent worker processes:

* each worker is a plain `python -c` subprocess speaking one JSON line per request on stdin/stdout
  (no multiprocessing: no pickling, no re-import of the caller's `__main__`); it ends when its stdin
  closes, i.e. when the parent dies;
* inside the worker (single-threaded, main thread) our own SIGALRM bounds each comparison
  (`timeout_s`) and math-verify's own timeouts are disabled;
* the parent waits `timeout_s + KILL_GRACE_S` at most; a worker stuck where signals cannot reach it is
  killed and replaced (a timeout either way);
* up to `max_workers` workers run at once (one per calling thread), started lazily.

The result of one request: True / False, or None for a timeout (the caller counts it; it grades as
not equivalent).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading

log = logging.getLogger(__name__)
KILL_GRACE_S = 3.0
_SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_WORKER_CMD = f"import sys; sys.path.insert(0, {_SRC!r}); from mtpo.agent.mathverify_pool import serve; serve()"


# ------------------------------------------------------------------------------------ in the worker


class _Deadline(BaseException):
    """Our own alarm: a BaseException so math-verify's `except Exception` cannot swallow it."""


def compare(pred: str, gold: str) -> bool:
    """math-verify on two normalized LaTeX answers, plus a numeric veto: math-verify rounds floats to 6
    places and compares other numbers with `evalf(chop=True)`, so 1e-9 equals 2e-9 and
    1/2^98 equals 1/2^99 there; when both sides are plain numbers we require them to be close
    relative to their size as well."""
    from math_verify import verify

    g, p = _parse(gold), _parse(pred)
    if not g or not p:
        return False
    ok = verify(list(g), list(p), timeout_seconds=None, allow_set_relation_comp=True)
    return bool(ok) and not _numbers_differ(g[0], p[0])


@functools.lru_cache(maxsize=4096)
def _parse(latex: str) -> tuple:
    """math-verify's parse, cached: one gold is compared with many predictions (maj@k, pass@k)."""
    from latex2sympy2_extended.math_normalization import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse

    # math-verify's default normalization strips "units" such as t, s, m, o after a number, so `4t`
    # and `4s` both parse as 4; units are removed (only from \\text{} and words) before we get here
    norm = NormalizationConfig(basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all", equations=False)
    config = [LatexExtractionConfig(boxed_match_priority=0, normalization_config=norm)]
    return tuple(_imaginary(x) for x in parse("\\boxed{" + latex + "}", extraction_config=config, parsing_timeout=None))


def _imaginary(expr):
    """math-verify reads `i` as a symbol, so `i^2` is not -1 there; in a final answer it is the
    imaginary unit (applied to both sides alike)."""
    import sympy

    if not isinstance(expr, (sympy.Basic, sympy.MatrixBase)):
        return expr
    units = {s: sympy.I for s in expr.free_symbols if getattr(s, "name", None) == "i"}
    if units:
        try:
            return expr.subs(units)
        except Exception:  # noqa: BLE001 - keep the expression as parsed
            return expr
    return expr


def _numbers_differ(a, b) -> bool:
    import sympy

    try:
        if not (isinstance(a, sympy.Basic) and isinstance(b, sympy.Basic)):
            return False
        if a.free_symbols or b.free_symbols or not (a.is_number and b.is_number):
            return False
        x, y = sympy.N(a, 60), sympy.N(b, 60)
        if not (x.is_finite and y.is_finite):
            return False
        scale = max(abs(x), abs(y))
        floats = a.has(sympy.Float) or b.has(sympy.Float)
        tol = sympy.Float("1e-4", 60) if floats else sympy.Float("1e-40", 60)
        return bool(abs(x - y) > tol * scale)
    except Exception:  # a veto is optional: never let it turn into an error
        return False


def serve() -> None:
    """Worker main loop: {"p", "g", "t"} in, {"r": true|false|null, "e"?: str} out, one line each."""
    import signal

    logging.disable(logging.WARNING)  # math-verify warns per timeout; the parent counts them

    def alarm(signum, frame):
        raise _Deadline

    signal.signal(signal.SIGALRM, alarm)
    compare("1", "\\sqrt{1}")  # import sympy/math-verify and build the parser before any deadline runs
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the protocol
    for line in sys.stdin:
        req = json.loads(line)
        resp: dict = {"r": False}
        try:
            signal.setitimer(signal.ITIMER_REAL, float(req["t"]))
            resp["r"] = compare(req["p"], req["g"])
        except _Deadline:
            resp["r"] = None
        except Exception as e:  # noqa: BLE001 - a parse failure is "not equivalent", reported
            resp["e"] = f"{type(e).__name__}: {e}"[:200]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        out.write(json.dumps(resp) + "\n")
        out.flush()


# ------------------------------------------------------------------------------------ in the parent


class _Worker:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CMD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            # its own session: a terminal's Ctrl-C (sent to the whole foreground process group) reaches
            # only the parent, which reports it in one line, not once more per worker as a traceback;
            # the worker still ends with the parent (its stdin closes)
            start_new_session=True,
        )
        # the first request also pays for importing sympy and math-verify (~1 s, more on a loaded
        # machine): allow for it once instead of mistaking it for a hang
        self.startup_s = 30.0

    def ask(self, pred: str, gold: str, timeout_s: float) -> dict:
        """The worker's answer, or {"r": None, "killed": True} when it had to be killed."""
        self.proc.stdin.write(json.dumps({"p": pred, "g": gold, "t": timeout_s}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s + KILL_GRACE_S + self.startup_s)
        self.startup_s = 0.0
        line = self.proc.stdout.readline() if ready else ""
        if line:
            return json.loads(line)
        self.kill()
        if ready:  # end of file: it died (e.g. math-verify missing), an error rather than a timeout
            return {"r": False, "e": f"math-verify worker exited with code {self.proc.returncode}", "killed": True}
        return {"r": None, "killed": True}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class MathVerifyPool:
    """A bounded set of worker processes; `check` may be called from any number of threads."""

    def __init__(self, max_workers: int | None = None):
        self.max_workers = max_workers or max(1, min(2, os.cpu_count() or 1))
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(self.max_workers)
        self._lock = threading.Lock()
        self._all: list[_Worker] = []
        self.pid = os.getpid()

    def check(self, pred: str, gold: str, timeout_s: float) -> tuple[bool | None, str | None]:
        """(True/False/None for a timeout, error text or None)."""
        with self._slots:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                worker = None
            if worker is None or not worker.alive():
                worker = _Worker()
                with self._lock:
                    self._all.append(worker)
            try:
                resp = worker.ask(pred, gold, timeout_s)
            except (OSError, ValueError) as e:  # broken pipe: the worker died under us
                worker.kill()
                return False, f"worker failed: {e}"
            if resp.get("killed"):
                self._forget(worker)
            else:
                self._idle.put(worker)
            return resp.get("r"), resp.get("e")

    def warm(self) -> None:
        """Start the missing workers now, in parallel, and wait until each answers (importing sympy and
        math-verify takes about a second): call it while a model loads."""
        with self._lock:
            new = [_Worker() for _ in range(self.max_workers - len(self._all))]
            self._all.extend(new)
        for worker in new:
            if worker.ask("1", "1", 60.0).get("killed"):
                self._forget(worker)
            else:
                self._idle.put(worker)

    def _forget(self, worker: _Worker) -> None:
        """Drop a dead worker. `shutdown` (at exit, e.g. after Ctrl-C) may have dropped it already while a
        background `warm` still waited on it."""
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)

    def shutdown(self) -> None:
        with self._lock:
            workers, self._all = self._all, []
        for w in workers:
            w.kill()
