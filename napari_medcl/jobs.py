"""Worker processes for ``medcl-predict --jobs K``: K processes on one machine, each with the model loaded once.

The parent hands out one case at a time over a pipe to each worker and prints what comes back, in the order
cases finish. Each worker takes the case's lock and writes the case all or nothing (``cli._process_case``,
the code a single-process run uses), so the folder only ever holds complete cases and temporary files.

Threads: ONNX Runtime sizes its intra-op pool from the CPUs the process may run on (``onnx_session``'s
``physical_cores``, read from the affinity mask; there is no thread-count parameter), so each worker is
pinned to its own share of the parent's CPUs before it loads the model: K jobs never start more threads than
there are cores. Where affinity cannot be set (macOS, Windows), each worker sizes its pool for the whole
machine.

Failures: a worker process that dies (a crash in native code, the OS killing it for memory) fails the case it
was segmenting, with one line; the parent removes that case's temporary files (under the case's lock) and a
new worker takes its place for the remaining cases. Ctrl+C (SIGINT to the
parent, or to the whole process group from a terminal) stops every worker: workers ignore SIGINT, the
parent sends each one SIGTERM, which a worker turns into KeyboardInterrupt, so the case in progress is
abandoned the way a single process abandons it (temporary files removed, lock released). A worker whose
parent dies (even by SIGKILL) gets SIGTERM from the kernel on Linux (``PR_SET_PDEATHSIG``); elsewhere it
stops after its current case, when it finds the pipe closed.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_STOP_TIMEOUT_S = 30.0  # how long a stopped worker gets to unwind before it is killed


@dataclass
class _Worker:
    slot: int
    process: Any
    conn: Any
    task: tuple[int, Path, str] | None = None  # (index, input, case) being segmented
    ready: bool = False


@dataclass
class Pool:
    """What ``run_jobs`` needs: the parsed arguments, the model's SHA-256, and the CPU set of each slot."""

    args: Any
    model_sha256: str
    cpu_sets: list[set[int]] | None = field(default=None)


def cpu_shares(jobs: int) -> list[set[int]] | None:
    """The parent's CPUs cut into ``jobs`` contiguous shares (one CPU each, reused, when there are fewer CPUs
    than jobs); None where the affinity mask cannot be read or set."""
    if not (hasattr(os, "sched_getaffinity") and hasattr(os, "sched_setaffinity")):
        return None
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except OSError:
        return None
    if len(cpus) < jobs:
        return [{cpus[i % len(cpus)]} for i in range(jobs)]
    size, extra = divmod(len(cpus), jobs)
    shares, start = [], 0
    for i in range(jobs):
        end = start + size + (1 if i < extra else 0)
        shares.append(set(cpus[start:end]))
        start = end
    return shares


def run_jobs(cases: Sequence[tuple[Path, str]], pool: Pool, jobs: int) -> Iterator[tuple[Path, str, Any]]:
    """Segment ``cases`` with ``jobs`` worker processes; yield (input, case, ``predict_case.CaseResult``) as each case
    ends. A KeyboardInterrupt in the parent stops the workers before it propagates."""
    import multiprocessing
    from multiprocessing.connection import wait

    from napari_medcl.cohort import clear_abandoned_case
    from napari_medcl.predict_case import CaseResult

    context = multiprocessing.get_context("spawn")
    pending = deque((i, path, case) for i, (path, case) in enumerate(cases))
    workers: dict[int, _Worker] = {}

    def start(slot: int) -> None:
        parent_end, child_end = context.Pipe()
        cpus = None if pool.cpu_sets is None else pool.cpu_sets[slot]
        process = context.Process(
            target=_worker_main,
            args=(child_end, pool.args, cpus, os.getpid()),
            name=f"medcl-predict-job{slot}",
            daemon=True,
        )
        with _sigint_blocked():  # the worker starts with SIGINT blocked and then ignores it
            process.start()
        child_end.close()
        workers[slot] = _Worker(slot, process, parent_end)

    def hand_out(worker: _Worker) -> None:
        worker.task = pending.popleft() if pending else None
        with suppress(OSError):  # it died meanwhile: its sentinel says so next
            worker.conn.send(worker.task)

    try:
        for slot in range(min(jobs, len(pending))):
            start(slot)
        while workers:
            waitables: dict[Any, _Worker] = {}
            for worker in workers.values():
                waitables[worker.conn] = worker
                waitables[worker.process.sentinel] = worker
            for ready in wait(list(waitables)):
                worker = waitables[ready]
                if worker.slot not in workers:
                    continue
                if ready is worker.conn:
                    try:
                        message = worker.conn.recv()
                    except (EOFError, OSError):
                        message = None  # it died: handled with its sentinel
                    if message is None:
                        continue
                    kind = message[0]
                    if kind == "ready":
                        worker.ready = True
                        if message[1] != pool.model_sha256:
                            yield from _fail_all(
                                pending, "the model file changed while the run started; run it again"
                            )
                        hand_out(worker)
                    elif kind == "result":
                        index, path, case = worker.task
                        worker.task = None
                        yield path, case, message[1]
                        hand_out(worker)
                    elif kind == "fatal":  # could not load the model: no other case for this worker
                        del workers[worker.slot]
                        worker.process.join(_STOP_TIMEOUT_S)
                        worker.conn.close()
                        if not workers:
                            yield from _fail_all(pending, message[1])
                    continue
                # The worker process ended.
                worker.process.join()
                worker.conn.close()
                del workers[worker.slot]
                if worker.task is not None:
                    _, path, case = worker.task
                    clear_abandoned_case(pool.args.output, case)
                    yield path, case, CaseResult("failed", err=(f"error: {path}: {_death(worker.process)}",))
                    if pending:
                        start(worker.slot)
                elif pending and not worker.ready:
                    yield from _fail_all(pending, f"worker process ended at start ({_death(worker.process)})")
    finally:
        _stop(workers.values())


def _fail_all(pending: deque, reason: str) -> Iterator[tuple[Path, str, Any]]:
    from napari_medcl.predict_case import CaseResult

    while pending:
        _, path, case = pending.popleft()
        yield path, case, CaseResult("failed", err=(f"error: {path}: not segmented: {reason}",))


def _death(process: Any) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        how = f"killed by {name}"
    else:
        how = f"exit status {code}"
    return f"the worker process segmenting it died ({how}); nothing of this case was written"


def _stop(workers: Any) -> None:
    """Ask every live worker to stop (SIGTERM: it unwinds its case), then wait; kill what does not end."""
    workers = list(workers)
    for worker in workers:
        if worker.process.is_alive():
            with suppress(OSError):
                os.kill(worker.process.pid, signal.SIGTERM)
    for worker in workers:
        worker.process.join(_STOP_TIMEOUT_S)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread while a worker starts, so the child inherits it blocked (POSIX); a Ctrl+C
    meanwhile is delivered to the parent when the block ends, not lost."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# ---- the worker process ------------------------------------------------------------------------------------


def _worker_main(conn: Any, args: Any, cpus: set[int] | None, parent_pid: int) -> None:
    """Load the model once, then segment each case the parent sends until it sends None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the workers stop
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGTERM, _interrupt_once)
    _die_with_parent(parent_pid)
    try:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        _serve(conn, args)
    except KeyboardInterrupt:
        pass
    finally:
        conn.close()


def _interrupt_once(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not break the unwinding
    raise KeyboardInterrupt


def _die_with_parent(parent_pid: int) -> None:
    """On Linux, have the kernel send SIGTERM when the parent dies; stop now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        raise SystemExit(0)


def _serve(conn: Any, args: Any) -> None:
    import warnings

    from napari_medcl.errors import InputWarning, MedclError
    from napari_medcl.onnx_session import open_session
    from napari_medcl.predict_case import process_case, wanted_from

    try:
        model = open_session(args.model, device=args.device)
    except MedclError as error:
        conn.send(("fatal", str(error)))
        return
    conn.send(("ready", model.sha256))
    wanted = wanted_from(args, model)
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        _, path, case = task
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", InputWarning)
            result = process_case(path, case, model, args, wanted, bar=False)
        lines = tuple(f"warning: {w.message}" for w in caught)
        if lines:
            result = type(result)(result.status, out=result.out, err=(*lines, *result.err))
        conn.send(("result", result))
