"""One queue per device: the predictions for a device run one after the other, in arrival order.

Two models (or two cases of one model) sharing a GPU at once would compete for its memory and its cores and
each take about twice as long, with the risk of running out of memory; one after the other, each request
finishes as early as it can. On a CPU, ONNX Runtime already uses every core for one prediction. A queue is a
single worker thread, so the HTTP event loop stays free to answer health checks and uploads meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class DeviceQueue:
    """Runs functions one at a time on one worker thread for ``device``; counts what waits and runs."""

    def __init__(self, device: str):
        self.device = device
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"medcl-serve-{device}")
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self.peak_running = 0
        self.done = 0

    async def run(self, work: Callable[[], T]) -> T:
        """Run ``work()`` on this device's worker once the earlier work is done; its result or exception."""
        with self._lock:
            self.waiting += 1
        future = self._executor.submit(self._counted, work)
        future.add_done_callback(self._uncount_cancelled)
        return await asyncio.wrap_future(future)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "device": self.device,
                "waiting": self.waiting,
                "running": self.running,
                "peak_running": self.peak_running,
                "done": self.done,
            }

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _uncount_cancelled(self, future: Any) -> None:
        if future.cancelled():  # taken off the queue before it started: _counted never ran
            with self._lock:
                self.waiting -= 1

    def _counted(self, work: Callable[[], T]) -> T:
        with self._lock:
            self.waiting -= 1
            self.running += 1
            self.peak_running = max(self.peak_running, self.running)
        try:
            return work()
        finally:
            with self._lock:
                self.running -= 1
                self.done += 1
