"""verifier.py: math-verify in a pool of killable worker processes, so that no answer can hang the trainer.

math-verify can take unbounded time (9^{9^{9^9}}, deep nesting) and its own timeout is signal.alarm, which works only
in a main thread. So each worker runs it in its main thread, and a worker still busy `timeout_s` after it got an
answer is killed and replaced, that answer counting as not equivalent. Workers are fresh interpreters (subprocess, not
fork, which is unsafe in a process holding torch and a vLLM engine; nor multiprocessing's spawn, which re-imports the
trainer's __main__ and its torch / vLLM imports). rewards.py starts the shared pool on the first math answer.

    pool = verifier.start_pool()   # close_pool() (also run at exit) stops it
    pool.verify([("\\frac{1}{2}", "0.5"), ("3", "4")], timeout_s=10.0)   # -> [True, False]
"""
import atexit
import contextlib
import os
import subprocess
import sys
import threading
import time
from functools import lru_cache
from multiprocessing.connection import Connection, wait

MATH_WORKERS = min(4, os.cpu_count() or 1)  # pool size, read when the pool starts
WORKER_START_TIMEOUT_S = 120.0  # importing math-verify (sympy) on a loaded machine
WORKER_MEMORY_BYTES = 4 << 30  # address-space cap per worker: 10^(10^10) must fail, not swap

# -- worker side: runs in a fresh interpreter, reads (key, pred, gold, seconds) and answers (key, bool) --

@lru_cache(maxsize=4096)
def _parse_gold(gold, seconds):
    from math_verify import parse
    return parse("\\boxed{" + gold + "}", parsing_timeout=seconds)

def _verify(pred, gold, seconds):
    """math-verify on one pair, in this process's main thread (its timeouts are signal.alarm, whole seconds)."""
    from math_verify import parse, verify
    pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=seconds)
    return bool(verify(_parse_gold(gold, seconds), pred_parsed, timeout_seconds=seconds))

def _worker_main():
    """Entry point of a worker process: stdin carries requests, a private copy of stdout carries results."""
    import logging
    import resource
    inp, out = Connection(os.dup(0), writable=False), Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # a stray print from a library goes to stderr, not into the result channel
    with contextlib.suppress(ValueError, OSError):  # a platform without the limit still has the kill-on-timeout
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # its timeout warnings would flood the log
    _verify("\\frac{1}{2}", "0.5", 30)  # sympy's lazy imports take ~1 s on first use: before "ready", not on an answer
    out.send(("ready", None))
    with contextlib.suppress(EOFError):  # the parent closed the pipe or died
        while True:
            key, pred, gold, seconds = inp.recv()
            try:
                ok = _verify(pred, gold, seconds)
            except Exception:  # MemoryError, RecursionError, sympy internals: not equivalent
                ok = False
            out.send((key, ok))

# -- parent side --

class _Worker:
    def __init__(self, first_start: bool = True):
        here = os.path.dirname(os.path.abspath(__file__))
        code = f"import sys; sys.path.insert(0, {here!r}); import verifier; verifier._worker_main()"
        (req_r, req_w), (res_r, res_w) = os.pipe(), os.pipe()  # Connections frame pickles over these pipes
        # start_new_session: Ctrl-C in a terminal reaches the trainer, which then closes the pool.
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=req_r, stdout=res_w, start_new_session=True)
        os.close(req_r)
        os.close(res_w)
        self.inp, self.out = Connection(req_w, readable=False), Connection(res_r, writable=False)
        self.ready, self.key, self.deadline = False, None, WORKER_START_TIMEOUT_S + time.monotonic()
        # A worker killed while starting (the OOM killer, a busy node) is replaced once; a second death at start-up
        # is a real fault (math-verify missing, a broken interpreter) and stops the run with a clear line.
        self.first_start = first_start

    def kill(self):
        self.inp.close()
        self.out.close()
        self.proc.kill()
        self.proc.wait()

class VerifierPool:
    """Worker processes running math-verify; verify() fans a batch out and keeps the input order."""

    def __init__(self, num_workers=None):
        self.workers = [_Worker() for _ in range(num_workers or MATH_WORKERS)]
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.killed = 0  # answers that hit the hard limit (or crashed their worker), for logging

    def verify(self, pairs, timeout_s: float = 10.0):
        """[(pred, gold)] -> [bool]: True when math-verify finds them equivalent within timeout_s each."""
        results = [False] * len(pairs)
        with self.lock:
            if not self.workers:
                raise RuntimeError("rewards: the math-verify pool is closed; call start_pool() for a new one")
            try:
                self._run(pairs, timeout_s, results)
            except BaseException:  # start-up failure, Ctrl-C: no worker may keep an answer of an abandoned batch
                self.close()
                raise
        return results

    def _run(self, pairs, timeout_s, results):
        # math-verify's own limits (whole seconds) end most slow cases cleanly before the hard kill.
        inner = max(1, int(timeout_s / 3))
        todo = list(range(len(pairs)))[::-1]  # a stack: pop() takes the next index
        while todo or any(w.key is not None for w in self.workers):
            for w in self.workers:
                if w.ready and w.key is None and todo:
                    key = todo.pop()
                    w.key, w.deadline = key, time.monotonic() + timeout_s
                    try:
                        w.inp.send((key, pairs[key][0], pairs[key][1], inner))
                    except OSError:  # died while idle: the answer was never seen, give it to another
                        todo.append(key)
                        self._replace(w)
            waiting = [w for w in self.workers if w.key is not None or not w.ready]
            readable = wait([w.out for w in waiting], max(0.0, min(w.deadline for w in waiting) - time.monotonic()))
            for w in waiting:
                if w.out in readable:
                    try:
                        key, ok = w.out.recv()
                    except (EOFError, OSError):  # the worker died (a crash on this answer, or at start-up)
                        if not w.ready and not w.first_start:
                            raise RuntimeError("rewards: a math-verify worker died while starting, twice; see its "
                                               "error above (is math-verify installed in this Python?)") from None
                        if w.ready:
                            self.killed += 1
                        self._replace(w, first_start=w.ready)
                        continue
                    if key == "ready":
                        w.ready = True
                    else:
                        results[key], w.key = ok, None
                elif time.monotonic() >= w.deadline:
                    if not w.ready:
                        raise RuntimeError(f"rewards: a math-verify worker did not start within "
                                           f"{WORKER_START_TIMEOUT_S:.0f} s (machine overloaded?)")
                    self.killed += 1  # past the hard limit: this answer stays False
                    self._replace(w)

    def _replace(self, worker, first_start: bool = True):
        worker.kill()
        self.workers[self.workers.index(worker)] = _Worker(first_start)

    def close(self):
        for w in self.workers:
            w.kill()
        self.workers = []

_POOL = None

def start_pool(num_workers=None):
    """The shared pool, started if needed (workers import math-verify in the background; returns at once)."""
    global _POOL
    if _POOL is None or not _POOL.workers or _POOL.pid != os.getpid():  # a forked child must not share pipes
        _POOL = VerifierPool(num_workers)
    return _POOL

def close_pool():
    """Stop the worker processes (also registered with atexit). The next math answer starts a new pool."""
    global _POOL
    if _POOL is not None and _POOL.pid == os.getpid():
        _POOL.close()
    _POOL = None

atexit.register(close_pool)
