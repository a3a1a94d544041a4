"""math-verify worker process: `python -m recipe.reward.mv_worker [--memory-mb N]`.

Started and killed by `recipe.reward.mv_pool.MathVerifyPool`; not meant to be run by hand.

Protocol over stdin/stdout: each message is an 8-byte big-endian length followed by a pickle.
The worker first sends ("ready", pid), then answers every request `(op, args)` with
("ok", value) or ("error", traceback_text). Ops:
  "verify"  (gold, pred) -> bool: math-verify equivalence of two answer strings
  "_sleep"  (seconds,)   -> seconds: test hook, lets tests provoke timeouts and kill a busy worker

math-verify's own timeouts are disabled here (parsing_timeout=None, timeout_seconds=None): they use
SIGALRM, which only works on a main thread. The parent enforces the time limit by killing this
process instead, which also stops work stuck inside C code (big-integer arithmetic).
"""

from __future__ import annotations

import argparse
import os
import pickle
import struct
import sys
import threading
import time
import traceback

HEADER = struct.Struct(">Q")  # length prefix of every pickled message on the pipes (shared with mv_pool)


def _read_exact(stream, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _send(out, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(HEADER.pack(len(data)) + data)
    out.flush()


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent dies: a worker busy in sympy never reads the closed stdin."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(1.0)


def _limit_memory(memory_mb: int) -> None:
    """Cap the address space so a runaway computation raises MemoryError instead of swapping
    the machine; math-verify reports that as "not equal"."""
    if memory_mb <= 0:
        return
    import resource

    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memory-mb", type=int, default=0, help="address-space cap in MiB (0: none)")
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args()

    # Keep the protocol channel private: anything printed by libraries goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer

    threading.Thread(target=_watch_parent, args=(args.parent_pid,), daemon=True).start()

    import logging

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # math-verify warns once per process that its timeout is disabled; the parent enforces it.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    configs = (LatexExtractionConfig(), ExprExtractionConfig())

    def op_verify(gold: str, pred: str) -> bool:
        gold_parsed = parse("\\boxed{" + gold + "}", configs, parsing_timeout=None)
        pred_parsed = parse("\\boxed{" + pred + "}", configs, parsing_timeout=None)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))

    def op_sleep(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    ops = {"verify": op_verify, "_sleep": op_sleep}
    # Warm up before reporting ready: the first parse/verify imports sympy and builds the LaTeX
    # parser (seconds), which must not count against the first real call's timeout.
    op_verify("\\frac{1}{2}", "0.5")
    _limit_memory(args.memory_mb)
    _send(out, ("ready", os.getpid()))

    while True:
        header = _read_exact(inp, HEADER.size)
        if header is None:
            return  # parent closed the pipe
        payload = _read_exact(inp, HEADER.unpack(header)[0])
        if payload is None:
            return
        op, op_args = pickle.loads(payload)
        try:
            if op not in ops:
                raise ValueError(f"unknown op {op!r}; known: {sorted(ops)}")
            _send(out, ("ok", ops[op](*op_args)))
        except Exception:
            _send(out, ("error", traceback.format_exc()))


if __name__ == "__main__":
    main()
