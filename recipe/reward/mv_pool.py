"""A small pool of math-verify worker processes with a hard per-call timeout.

Why processes, and why not `ProcessPoolExecutor`: math-verify can hang (sympy on huge powers), and
its own timeout uses SIGALRM, which fails off the main thread (verl calls the reward from executor
threads and Ray actors). A hung call must be stopped, and the only reliable way is to kill the
process doing it. `ProcessPoolExecutor` cannot kill one busy worker (and breaks the whole pool when
one dies), so each worker here is a plain `subprocess.Popen` of `recipe.reward.mv_worker` talking
over its stdin/stdout. Popen (fork+exec) does not re-import the caller's `__main__` and is safe from
a multi-threaded process, unlike multiprocessing's fork/spawn start methods.

Semantics of `MathVerifyPool.call(op, args, timeout)`:
  * a caller borrows an idle worker (waiting while all are busy), sends one request and waits at
    most `timeout` seconds for the answer; the wait for a worker to finish starting (importing
    math-verify, bounded by `start_timeout`) is not counted in `timeout`;
  * on timeout the worker is killed, a replacement is started in the background, and the call
    returns `PoolResult("timeout")`;
  * if the worker dies mid-call (killed from outside, OOM), a replacement is started and the call
    returns `PoolResult("crashed")`;
  * an exception inside the worker raises `WorkerError` in the caller (a bug, not a verdict).
Thread-safe; one pool per process (`get_pool()`), re-created after a fork.

Environment variables (read when the pool is created):
  BAPO_REWARD_MV_WORKERS    number of worker processes (default: min(4, CPU count))
  BAPO_REWARD_MV_MEMORY_MB  address-space cap per worker in MiB (default 4096, 0: none)
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Any

from recipe.reward.mv_worker import HEADER

logger = logging.getLogger("bapo_verl.reward")

# The directory holding the `recipe` package, so workers import this code even when the project is
# not installed (e.g. a Ray runtime_env working_dir).
_CODE_ROOT = str(Path(__file__).resolve().parents[2])
DEFAULT_START_TIMEOUT = 120.0


class WorkerError(RuntimeError):
    """The worker raised an exception (message holds its traceback) or could not start."""


class _Timeout(Exception):
    pass


class _Died(Exception):
    pass


@dataclass(frozen=True)
class PoolResult:
    """Outcome of one pool call: status "ok" (value holds the op's return), "timeout" or "crashed"."""

    status: str
    value: Any = None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


class _Worker:
    """One worker process and its pipes; used by one thread at a time."""

    def __init__(self, memory_mb: int):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_CODE_ROOT, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recipe.reward.mv_worker", "--memory-mb", str(memory_mb),
             "--parent-pid", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self.pid = self.proc.pid
        self.ready = False

    def _read_exact(self, n: int, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        # poll, not select: select fails on descriptors >= 1024, common in Ray worker processes
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        buf = b""
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000.0):
                raise _Timeout()
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise _Died()
            buf += chunk
        return buf

    def recv(self, deadline: float) -> tuple:
        size = HEADER.unpack(self._read_exact(HEADER.size, deadline))[0]
        return pickle.loads(self._read_exact(size, deadline))

    def send(self, obj) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.proc.stdin.write(HEADER.pack(len(data)) + data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise _Died() from None

    def wait_ready(self, timeout: float) -> None:
        if self.ready:
            return
        try:
            status, pid = self.recv(time.monotonic() + timeout)
        except _Timeout:
            self.kill()
            raise WorkerError(f"math-verify worker pid {self.pid} did not start within {timeout:.0f} s") from None
        except _Died:
            code = self.proc.wait()
            raise WorkerError(
                f"math-verify worker pid {self.pid} exited with code {code} while starting "
                "(see its traceback on stderr; is math-verify installed?)"
            ) from None
        if status != "ready" or pid != self.pid:
            raise WorkerError(f"math-verify worker pid {self.pid} sent {status!r} instead of ready")
        self.ready = True

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass  # the pipe is already broken; nothing left to release


@dataclass
class PoolStats:
    """Counters since the pool was created (read with `MathVerifyPool.stats()`)."""

    calls: int = 0
    timeouts: int = 0
    crashes: int = 0
    restarts: int = 0


class MathVerifyPool:
    """Pool of `size` math-verify worker processes (see the module docstring for the semantics).

    size: number of workers (default: BAPO_REWARD_MV_WORKERS or min(4, CPU count)).
    memory_mb: address-space cap per worker in MiB (default: BAPO_REWARD_MV_MEMORY_MB or 4096; 0: none).
    start_timeout: seconds a worker may take to import math-verify before WorkerError.
    """

    def __init__(self, size: int | None = None, memory_mb: int | None = None,
                 start_timeout: float = DEFAULT_START_TIMEOUT):
        self.size = size if size is not None else _env_int("BAPO_REWARD_MV_WORKERS", min(4, os.cpu_count() or 1))
        self.memory_mb = memory_mb if memory_mb is not None else _env_int("BAPO_REWARD_MV_MEMORY_MB", 4096)
        if self.size < 1:
            raise ValueError(f"math-verify pool size must be >= 1, got {self.size}")
        self.start_timeout = start_timeout
        self.owner_pid = os.getpid()
        self._lock = threading.Lock()
        self._stats = PoolStats()
        self._idle: Queue[_Worker] = Queue()
        self._all: set[_Worker] = set()
        self._closed = False
        for _ in range(self.size):
            self._idle.put(self._spawn())

    def _spawn(self) -> _Worker:
        worker = _Worker(self.memory_mb)
        with self._lock:
            self._all.add(worker)
        return worker

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        with self._lock:
            self._all.discard(worker)
            self._stats.restarts += 1
        return self._spawn()

    def worker_pids(self) -> list[int]:
        """Pids of all live workers (idle or busy)."""
        with self._lock:
            return sorted(w.pid for w in self._all)

    def stats(self) -> dict:
        """Counters: calls, timeouts, crashes (workers that died mid-call), restarts."""
        with self._lock:
            s = self._stats
            return {"calls": s.calls, "timeouts": s.timeouts, "crashes": s.crashes, "restarts": s.restarts}

    def call(self, op: str, args: tuple, timeout: float) -> PoolResult:
        """Run `op(*args)` in a worker with a hard `timeout` in seconds (see the module docstring)."""
        if self._closed:
            raise RuntimeError("MathVerifyPool is closed")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        worker = self._idle.get()
        # Whatever happens below, a worker goes back to the idle queue: this one if it answered,
        # otherwise a fresh replacement (its state is unknown after a timeout, error or interrupt).
        healthy = False
        try:
            worker.wait_ready(self.start_timeout)
            with self._lock:
                self._stats.calls += 1
            worker.send((op, args))
            status, payload = worker.recv(time.monotonic() + timeout)
            healthy = True
        except _Timeout:
            with self._lock:
                self._stats.timeouts += 1
            return PoolResult("timeout")
        except _Died:
            with self._lock:
                self._stats.crashes += 1
            logger.warning("math-verify worker pid %d died during a call; starting a replacement", worker.pid)
            return PoolResult("crashed")
        finally:
            self._idle.put(worker if healthy else self._replace(worker))
        if status != "ok":
            raise WorkerError(f"math-verify worker failed on op {op!r}:\n{payload}")
        return PoolResult("ok", payload)

    def close(self) -> None:
        """Kill all workers; further calls raise."""
        self._closed = True
        with self._lock:
            workers = list(self._all)
            self._all.clear()
        for w in workers:
            w.kill()


_pool: MathVerifyPool | None = None
_pool_lock = threading.Lock()


def get_pool() -> MathVerifyPool:
    """The process-wide pool, created on first use (and again in a forked child, which must not
    share its parent's pipes)."""
    global _pool
    pool = _pool
    if pool is not None and pool.owner_pid == os.getpid():
        return pool
    with _pool_lock:
        if _pool is None or _pool.owner_pid != os.getpid():
            _pool = MathVerifyPool()
        return _pool


def _close_at_exit() -> None:
    if _pool is not None and _pool.owner_pid == os.getpid():
        _pool.close()


atexit.register(_close_at_exit)
