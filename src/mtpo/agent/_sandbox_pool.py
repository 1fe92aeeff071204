"""SandboxPool (re-exported by mtpo.agent.sandbox): many persistent sessions on a bounded thread pool."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mtpo.agent.sandbox import PythonSandbox


class SandboxPool:
    """Runs cells of many sessions on a bounded thread pool: one persistent session per key, the cells
    of one key in submission order, different keys concurrently (at most `max_workers` at a time).

        with SandboxPool(sandbox, max_workers=4) as pool:
            futures = [pool.submit(traj_id, code) for traj_id, code in cells]   # Future[CellResult]
            pool.close(traj_id)   # when a trajectory is done: its processes die, its memory is freed

    A session start failure (e.g. SandboxUnavailable) reaches the caller through the future; call
    `sandbox.check()` first to fail before any work. Idle sessions keep a process each (~12 MB RSS):
    close keys whose trajectories are finished.
    """

    def __init__(self, sandbox: PythonSandbox, max_workers: int = 4):
        self.sandbox = sandbox
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="mtpo-sandbox")
        self._lock = threading.Lock()
        self._sessions: dict = {}
        self._queues: dict = {}  # key -> deque of (code, future) not started yet
        self._scheduled: set = set()  # keys with a task in the executor
        self._closed = False

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    def submit(self, key, code: str) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("SandboxPool is shut down")
            self._queues.setdefault(key, deque()).append((code, future))
            if key not in self._scheduled:
                self._scheduled.add(key)
                self._executor.submit(self._run_next, key)
        return future

    def _run_next(self, key) -> None:
        """Run one queued cell of `key`, then reschedule the key behind the other keys (fairness)."""
        with self._lock:
            queue = self._queues.get(key)
            if not queue:
                self._scheduled.discard(key)
                self._queues.pop(key, None)
                return
            code, future = queue.popleft()
            session = self._sessions.get(key)
            if session is None:
                session = self._sessions[key] = self.sandbox.session()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(session.run(code))
            except BaseException as exc:  # SandboxUnavailable, a session closed meanwhile, ...
                future.set_exception(exc)
        with self._lock:
            if self._queues.get(key) and not self._closed:
                self._executor.submit(self._run_next, key)
            else:
                self._scheduled.discard(key)
                self._queues.pop(key, None)

    def close(self, key, wait: bool = False) -> None:
        """End `key`'s session now: every process of it is SIGKILLed before this returns; reaping them
        (a few ms to tens of ms) happens on a pool thread unless `wait`. Its queued cells are
        cancelled; a later `submit(key, ...)` starts a new session."""
        with self._lock:
            session = self._sessions.pop(key, None)
            for _, future in self._queues.pop(key, ()):
                future.cancel()
        if session is None:
            return
        session.kill()
        if not wait:
            try:
                self._executor.submit(session.close)
                return
            except RuntimeError:  # the executor is shut down
                pass
        session.close()

    def shutdown(self, wait: bool = True) -> None:
        """Cancel queued cells, end every session, stop the threads."""
        with self._lock:
            self._closed = True
            keys = set(self._sessions) | set(self._queues)
        for key in keys:
            self.close(key, wait=True)
        self._executor.shutdown(wait=wait)
