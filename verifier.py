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
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from functools import lru_cache

MATH_WORKERS = min(4, os.cpu_count() or 1)  # pool size, read when the pool starts
WORKER_START_TIMEOUT_S = 120.0  # importing math-verify (sympy) on a loaded machine
WORKER_MEMORY_BYTES = 4 << 30  # address-space cap per worker: 10^(10^10) must fail, not swap

# -- worker side: runs in a fresh interpreter, reads (key, pred, gold, seconds) and answers (key, bool) --

def _send(fd, obj):
    payload = pickle.dumps(obj)
    os.write(fd, struct.pack("<I", len(payload)) + payload)

def _recv(fd):
    """One framed message from fd, or None at end of file."""
    header = _read_exact(fd, 4)
    payload = None if header is None else _read_exact(fd, struct.unpack("<I", header)[0])
    return None if payload is None else pickle.loads(payload)

def _read_exact(fd, size):
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return None
        data += chunk
    return data

@lru_cache(maxsize=4096)
def _parse_gold(gold, seconds):
    from math_verify import parse
    return parse("\\boxed{" + gold + "}", parsing_timeout=seconds)

def _verify(pred, gold, seconds):
    """math-verify on one pair, in this process's main thread (its timeouts are signal.alarm, whole seconds)."""
    from math_verify import parse, verify
    gold_parsed = _parse_gold(gold, seconds)
    pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=seconds)
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=seconds))

def _worker_main():
    """Entry point of a worker process: stdin carries requests, a private copy of stdout carries results."""
    import logging
    import resource
    out_fd, in_fd = os.dup(1), os.dup(0)
    os.dup2(2, 1)  # a stray print from a library goes to stderr, not into the result channel
    with contextlib.suppress(ValueError, OSError):  # a platform without the limit still has the kill-on-timeout
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # its timeout warnings would flood the log
    _verify("\\frac{1}{2}", "0.5", 30)  # sympy's lazy imports take ~1 s on first use: before "ready", not on an answer
    _send(out_fd, ("ready", None))
    while (message := _recv(in_fd)) is not None:  # None: the parent closed the pipe or died
        key, pred, gold, seconds = message
        try:
            ok = _verify(pred, gold, seconds)
        except Exception:  # MemoryError, RecursionError, sympy internals: not equivalent
            ok = False
        _send(out_fd, (key, ok))

# -- parent side --

class _Worker:
    def __init__(self):
        here = os.path.dirname(os.path.abspath(__file__))
        code = f"import sys; sys.path.insert(0, {here!r}); import verifier; verifier._worker_main()"
        # start_new_session: Ctrl-C in a terminal reaches the trainer, which then closes the pool.
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     bufsize=0, start_new_session=True)
        self.out, self.inp = self.proc.stdout.fileno(), self.proc.stdin.fileno()
        self.ready, self.key, self.deadline = False, None, WORKER_START_TIMEOUT_S + time.monotonic()

    def kill(self):
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):  # a dead worker's pipe may already be broken
                stream.close()
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
                        _send(w.inp, (key, pairs[key][0], pairs[key][1], inner))
                    except OSError:  # died while idle: the answer was never seen, give it to another
                        todo.append(key)
                        self._replace(w)
            waiting = [w for w in self.workers if w.key is not None or not w.ready]
            wait = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            readable, _, _ = select.select([w.out for w in waiting], [], [], wait)
            for w in waiting:
                if w.out in readable:
                    message = _recv(w.out)
                    if message is None:  # the worker died (a crash on this answer, or at start-up)
                        if not w.ready:
                            raise RuntimeError("rewards: a math-verify worker died while starting; see its "
                                               "error above (is math-verify installed in this Python?)")
                        self.killed += 1
                        self._replace(w)
                    elif message[0] == "ready":
                        w.ready = True
                    else:
                        results[message[0]] = message[1]
                        w.key = None
                elif time.monotonic() >= w.deadline:
                    if not w.ready:
                        raise RuntimeError(f"rewards: a math-verify worker did not start within "
                                           f"{WORKER_START_TIMEOUT_S:.0f} s (machine overloaded?)")
                    self.killed += 1  # past the hard limit: this answer stays False
                    self._replace(w)

    def _replace(self, worker):
        worker.kill()
        self.workers[self.workers.index(worker)] = _Worker()

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
