"""The server's sessions: one uploaded scan and the model chosen for it, kept until closed or idle too long.

A session is what makes "upload once, predict many times" work: the voxels stay on the server between
predictions. Each session holds an interactive session (``napari_medcl.interactive.CaseSession``, the one the
widget uses in-process): its predictions and its prompts, undo, brush edits and next-region questions all go
through it, so the server keeps the labels and the prompt history and a click sends back only the box it
changed. Everything that touches it runs on the device queue under the session's lock: a prompt never runs
while another request of the same session does. Memory: besides the upload, a session keeps the model's
class probabilities (float32 per class) and the labels once it has a prediction, as prompts need them.

Sessions expire after ``idle_timeout`` seconds without a request (a crashed or closed viewer never says
goodbye); a prediction in progress keeps its session alive. A request for an expired session is refused with
the code ``session_expired`` (and an unknown one with ``session_unknown``, e.g. after a restart), so the
client knows to upload again rather than fail. At ``max_sessions`` a new session is refused with "server
busy (N of N sessions in use)".
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_medcl.interactive import CaseSession
from napari_medcl.prediction import Progress
from napari_medcl.session import InferenceSession
from napari_medcl.volume import Prediction, Volume

# How many expired session ids are remembered, to tell "expired" from "never existed".
REMEMBERED_EXPIRED = 4096


class Refused(Exception):
    """A request the server turns down: HTTP ``status``, a machine-readable ``code`` the client acts on
    (``session_expired``, ``server_busy``, ...) and one line for the user."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class StoredResult:
    """The outputs of a session's last prediction, ready to send: ``npz`` from
    ``transfer.prediction_to_npz``."""

    id: str
    npz: bytes


@dataclass(eq=False)
class ServerSession:
    """One uploaded scan (``volume``, no source or metadata: only voxels and geometry travel) and the served
    model ``model_name`` that segments it. ``case``: the interactive session on them (labels, prompts);
    ``result``: the last prediction's outputs, until the next one; ``lock``: held by whatever runs on
    ``case``."""

    id: str
    volume: Volume
    model_name: str
    model: InferenceSession
    device: str
    last_used: float
    busy: int = 0
    result: StoredResult | None = None
    case: CaseSession = field(init=False)
    lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    # The model's own labels, each prediction's pasted over the last inside its region as ``case`` takes
    # them: what a corrected case is compared with to tell what the user changed.
    model_labels: np.ndarray | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.case = CaseSession(self.volume, self.model, device=self.device)

    def predict_iter(
        self, region: Any = None, cancel: Any = None, **options: Any
    ) -> Iterator[Progress | Prediction]:
        """Progress events, then the Prediction of ``region`` (None: the whole scan), run by ``case`` (which
        takes its labels and replays the prompts onto them); the options of
        ``napari_medcl.prediction.predict_iter`` that a client may set (``app.CLIENT_OPTIONS``). The
        probabilities are dropped from the Prediction unless ``return_probabilities`` asks for them."""
        keep_probabilities = bool(options.pop("return_probabilities", False))
        for item in self.case.predict_iter(region=region, cancel=cancel, **options):
            if isinstance(item, Prediction):
                self._keep_model_labels(item)
                if not keep_probabilities:
                    item = dataclasses.replace(item, probabilities=None)
            yield item

    def _keep_model_labels(self, prediction: Prediction) -> None:
        labels = prediction.labels.array
        roi = prediction.provenance.roi if prediction.provenance is not None else None
        inside = (slice(None),) * labels.ndim if roi is None else tuple(slice(int(a), int(b)) for a, b in roi)
        if self.model_labels is None or self.model_labels.dtype != labels.dtype:
            self.model_labels = np.zeros_like(labels)
        self.model_labels[inside] = labels[inside]


class SessionStore:
    """The live sessions, thread-safe (the HTTP handlers and the device worker both use it)."""

    def __init__(self, *, max_sessions: int, idle_timeout: float, clock: Any = time.monotonic):
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, ServerSession] = {}
        self._expired: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def check_room(self) -> None:
        """Refused (503 server_busy) when a new session would not fit; run before reading an upload."""
        with self._lock:
            self._sweep_locked()
            self._refuse_if_full()

    def open(self, volume: Volume, model_name: str, model: InferenceSession, device: str) -> ServerSession:
        """A new session for ``volume``; Refused when ``max_sessions`` are in use."""
        with self._lock:
            self._sweep_locked()
            self._refuse_if_full()
            session = ServerSession(
                id=secrets.token_urlsafe(16),
                volume=volume,
                model_name=model_name,
                model=model,
                device=device,
                last_used=self._clock(),
            )
            self._sessions[session.id] = session
            return session

    def get(self, session_id: str) -> ServerSession:
        """The live session ``session_id``, marked as used now; Refused (410 session_expired, 404
        session_unknown) otherwise."""
        with self._lock:
            self._sweep_locked()
            session = self._sessions.get(session_id)
            if session is None:
                if session_id in self._expired:
                    raise Refused(
                        410,
                        "session_expired",
                        f"session expired after {self.idle_timeout:g} s without a request; upload the image "
                        "again",
                    )
                raise Refused(
                    404, "session_unknown", "no such session on this server; upload the image again"
                )
            session.last_used = self._clock()
            return session

    def close(self, session_id: str) -> bool:
        """Forget the session (its voxels and result are freed); False when there was none."""
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def sweep(self) -> int:
        """Drop the sessions idle for longer than ``idle_timeout``; return how many."""
        with self._lock:
            return self._sweep_locked()

    @contextmanager
    def in_use(self, session: ServerSession) -> Iterator[ServerSession]:
        """Keep ``session`` from expiring while a request waits or runs on it (and count the idle time from the end)."""
        with self._lock:
            session.busy += 1
        try:
            yield session
        finally:
            with self._lock:
                session.busy -= 1
                session.last_used = self._clock()

    def _refuse_if_full(self) -> None:
        if len(self._sessions) >= self.max_sessions:
            n = self.max_sessions
            raise Refused(
                503,
                "server_busy",
                f"server busy ({len(self._sessions)} of {n} sessions in use); try again later",
                headers={"Retry-After": "30"},
            )

    def _sweep_locked(self) -> int:
        now = self._clock()
        idle = [
            sid for sid, s in self._sessions.items() if not s.busy and now - s.last_used > self.idle_timeout
        ]
        for sid in idle:
            del self._sessions[sid]
            self._expired[sid] = None
        while len(self._expired) > REMEMBERED_EXPIRED:
            self._expired.popitem(last=False)
        return len(idle)
