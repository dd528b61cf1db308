"""The HTTP service of medcl-serve (FastAPI): health, models, sessions, predictions, results.

Endpoints (all but ``/health`` need ``Authorization: Bearer <token>`` when the server has a token):

- ``GET /health``: ``{"status": "ok", "version"}``, for load balancers; says nothing about models or sessions.
- ``GET /models``: the served models with their specs, the default, and the upload limit.
- ``GET /status``: sessions in use, the device queue, the server's peak memory.
- ``POST /sessions?model=NAME``: body = ``transfer.volume_to_npz``; opens a session (201, its id and spec).
- ``POST /sessions/{id}/predict``: JSON ``{"region": ..., "options": {...}}``; answers with one JSON line per
  event (``progress``, ``waiting`` while queued or between progress lines, and last ``result`` or ``error``),
  so a proxy sees bytes flowing however long the prediction takes. ``result`` carries the provenance, the
  verdict and the box the outputs were cut to.
- ``GET /sessions/{id}/results/{result}``: the outputs as ``transfer.prediction_to_npz``.
- ``DELETE /sessions/{id}``: close the session.

Every refusal is ``{"error": one line, "code": ...}`` with a fitting status (400 bad request, 401 token,
404 unknown model or session, 410 session expired, 413 upload too large, 503 busy).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from napari_medcl import __version__
from napari_medcl.errors import Cancelled, MedclError
from napari_medcl.prediction import Progress
from napari_medcl.region import plan_for_model
from napari_medcl.serve.device_queue import DeviceQueue
from napari_medcl.serve.served_models import NAME_PATTERN, ServedModels
from napari_medcl.serve.sessions import CaseSession, Refused, SessionStore, StoredResult
from napari_medcl.transfer import box_to_json, prediction_to_npz, volume_from_npz
from napari_medcl.volume import Prediction

logger = logging.getLogger("medcl-serve")

# The options of predict_iter a client may set, with the JSON types each accepts. The device, backend and
# precision are the server's; a path, a DICOM series or read limits make no sense for uploaded voxels.
CLIENT_OPTIONS: dict[str, tuple[type, ...]] = {
    "overlap": (int, float),
    "tta": (bool,),
    "batch_size": (int,),
    "return_probabilities": (bool,),
    "scan_is_masked": (bool, type(None)),
}
MAX_JSON_BYTES = 64 * 1024
# Seconds between lines of a prediction's answer at most (a "waiting" line when nothing else was sent):
# proxies close connections that stay silent (nginx after 60 s), and the client notices a dead server.
HEARTBEAT_SECONDS = 5.0
# Progress lines per second at most: a model with thousands of small windows would otherwise send thousands.
PROGRESS_HZ = 10.0


@dataclass(frozen=True)
class ServerSettings:
    """What ``medcl-serve``'s options set. ``token``: the bearer token clients must send (None: no token,
    loopback only; the command checks that). ``max_upload_bytes`` bounds a request body as sent;
    ``max_voxel_bytes`` an uploaded image once unpacked. ``idle_timeout`` in seconds."""

    device: str = "auto"
    token: str | None = None
    max_sessions: int = 16
    max_upload_bytes: int = 512 * 1024**2
    max_voxel_bytes: int = 2 * 1024**3
    idle_timeout: float = 600.0


def create_app(models: ServedModels, settings: ServerSettings) -> FastAPI:
    """The FastAPI application serving ``models`` with ``settings``."""
    store = SessionStore(max_sessions=settings.max_sessions, idle_timeout=settings.idle_timeout)
    queue = DeviceQueue(settings.device)
    outcomes = PredictionOutcomes()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(_sweep_forever(store))
        try:
            yield
        finally:
            sweeper.cancel()
            queue.shutdown()

    app = FastAPI(
        title="medcl-serve",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.store, app.state.queue = store, queue

    @app.exception_handler(Refused)
    async def refused(_request: Request, error: Refused) -> JSONResponse:
        return JSONResponse(
            {"error": error.message, "code": error.code}, status_code=error.status, headers=error.headers
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        message = f"bad request: {where} {first.get('msg', '')}".strip()
        return JSONResponse({"error": message, "code": "bad_request"}, status_code=400)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    router = APIRouter(dependencies=[Depends(_token_check(settings.token))])

    @router.get("/models")
    async def list_models() -> dict[str, Any]:
        return {
            "models": models.describe(),
            "default": models.default,
            "device": settings.device,
            "max_upload_bytes": settings.max_upload_bytes,
            "idle_timeout": settings.idle_timeout,
        }

    @router.get("/status")
    async def status() -> dict[str, Any]:
        return {
            "sessions": len(store),
            "max_sessions": settings.max_sessions,
            "queue": queue.stats(),
            "predictions": outcomes.counts(),
            "peak_rss_bytes": _peak_rss_bytes(),
        }

    @router.post("/sessions", status_code=201)
    async def open_session(request: Request, model: str | None = None) -> dict[str, Any]:
        name = models.default if model is None else _served_name(model, models)
        store.check_room()  # before the upload is read: a busy server does not take 500 MB first
        body = await _read_body(request, settings.max_upload_bytes)
        try:
            # Unpacking takes a moment for a large scan: off the event loop, which keeps answering meanwhile.
            volume = await asyncio.to_thread(volume_from_npz, body, max_bytes=settings.max_voxel_bytes)
        except MedclError as error:
            raise Refused(400, "bad_volume", f"upload refused: {error}") from None
        del body
        session = store.open(volume, name, models.sessions[name], settings.device)
        return {
            "session": session.id,
            "model": name,
            "spec": session.model.spec.to_dict(),
            "idle_timeout": settings.idle_timeout,
        }

    @router.post("/sessions/{session_id}/predict")
    async def predict(session_id: str, request: Request) -> StreamingResponse:
        session = store.get(session_id)
        region, options = _parse_predict(await _read_body(request, MAX_JSON_BYTES), session)
        return StreamingResponse(
            _prediction_lines(session, store, queue, outcomes, region, options),
            media_type="application/x-ndjson",
        )

    @router.get("/sessions/{session_id}/results/{result_id}")
    async def result(session_id: str, result_id: str) -> Response:
        stored = store.get(session_id).result
        if stored is None or not secrets.compare_digest(stored.id.encode(), result_id.encode()):
            raise Refused(
                404, "result_unknown", "no such result in this session (a later prediction replaced it)"
            )
        return Response(stored.npz, media_type="application/octet-stream")

    @router.delete("/sessions/{session_id}", status_code=204)
    async def close(session_id: str) -> Response:
        store.close(session_id)
        return Response(status_code=204)

    app.include_router(router)
    return app


def _token_check(token: str | None) -> Any:
    """The dependency refusing requests without ``Authorization: Bearer <token>`` (401)."""
    expected = None if token is None else token.encode("utf-8")

    async def check(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        # compare_digest takes as long whatever the first wrong byte, so timing tells nothing of the token.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), expected):
            raise Refused(
                401,
                "bad_token",
                "missing or wrong token (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


def _served_name(name: str, models: ServedModels) -> str:
    """``name`` when it is a served model; Refused otherwise (400 for anything that looks like a path)."""
    if _looks_like_path(name):
        raise Refused(400, "path_refused", f"the server takes model names, not paths ({name!r})")
    if name not in models.sessions:
        raise Refused(
            404, "unknown_model", f"unknown model {name!r}; this server serves: {', '.join(models.names)}"
        )
    return name


def _looks_like_path(text: str) -> bool:
    return not NAME_PATTERN.fullmatch(text) or text.lower().endswith(
        (".onnx", ".nii", ".nii.gz", ".nrrd", ".mha", ".dcm")
    )


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) from its Content-Length before any of it is read when it is over
    ``limit``, and while it streams in when the header is absent or lies."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise Refused(400, "bad_request", f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise _too_large(f"{size:,} bytes", limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(f"more than {limit:,} bytes", limit)
    return bytes(body)


def _too_large(size: str, limit: int) -> Refused:
    return Refused(
        413,
        "too_large",
        f"upload of {size} refused: this server takes at most {limit:,} bytes (medcl-serve --max-upload-bytes)",
        headers={"Connection": "close"},
    )


def _parse_predict(body: bytes, session: CaseSession) -> tuple[Any, dict[str, Any]]:
    """(region, options) from a predict request's JSON, checked; Refused (400) for anything else."""
    try:
        request = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Refused(400, "bad_request", "the predict request is not JSON") from None
    if not isinstance(request, dict) or set(request) - {"region", "options"}:
        raise Refused(400, "bad_request", 'the predict request must be {"region": ..., "options": {...}}')
    region = _region_from_json(request.get("region"))
    options = request.get("options") or {}
    if not isinstance(options, dict):
        raise Refused(400, "bad_request", "options must be a JSON object")
    for key, value in options.items():
        if isinstance(value, str) and ("/" in value or "\\" in value):
            raise Refused(400, "path_refused", f"the server reads no files; option {key!r} names a path")
        allowed = CLIENT_OPTIONS.get(key)
        if allowed is None:
            raise Refused(
                400,
                "bad_option",
                f"option {key!r} is not taken by the server (it takes {', '.join(CLIENT_OPTIONS)})",
            )
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise Refused(400, "bad_option", f"option {key!r} has the wrong type ({value!r})")
    try:
        plan_for_model(region, session.volume, session.model.spec)  # a bad region is refused up front
    except MedclError as error:
        raise Refused(400, "bad_region", str(error)) from None
    return region, options


def _region_from_json(region: Any) -> Any:
    """None, ["slice", axis, index] or [[start, stop], ...] with whole numbers (or null ends); the same
    value for ``predict_iter``. Refused for anything else, a string that could be a path included."""
    if region is None:
        return None
    if isinstance(region, list) and len(region) == 3 and region[0] == "slice":
        if all(isinstance(v, int) and not isinstance(v, bool) for v in region[1:]):
            return ("slice", region[1], region[2])
    elif isinstance(region, list) and all(
        isinstance(pair, list)
        and len(pair) == 2
        and all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in pair)
        for pair in region
    ):
        return tuple(tuple(pair) for pair in region)
    if any(isinstance(v, str) and ("/" in v or "\\" in v) for v in _flatten(region)):
        raise Refused(400, "path_refused", "the server reads no files; the region names a path")
    raise Refused(
        400,
        "bad_region",
        f'region must be null, ["slice", axis, index] or [[start, stop], ...], got {region!r}',
    )


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, list | tuple):
        return [item for part in value for item in _flatten(part)]
    if isinstance(value, dict):
        return _flatten(list(value.values()))
    return [value]


class PredictionOutcomes:
    """How the server's predictions ended: done, cancelled (the client cancelled or went away), failed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("done", "cancelled", "failed"), 0)

    def add(self, outcome: str) -> None:
        with self._lock:
            self._counts[outcome] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


async def _prediction_lines(
    session: CaseSession,
    store: SessionStore,
    queue: DeviceQueue,
    outcomes: PredictionOutcomes,
    region: Any,
    options: dict[str, Any],
) -> AsyncIterator[bytes]:
    """The answer to a predict request, line by line: progress events as the device worker runs the
    prediction, then the result (stored in the session) or an error. When the client goes away, the
    prediction is cancelled at its next window, so the device is not kept busy for nobody."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    cancel = threading.Event()

    def send(kind: str, item: Any) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (kind, item))

    def work() -> tuple[Prediction, tuple[float, float]]:
        started = time.monotonic()
        prediction, last = None, -1.0
        try:
            with store.in_use(session):
                for item in session.predict_iter(region=region, cancel=cancel, **options):
                    if isinstance(item, Progress):
                        now = time.monotonic()
                        edge = item.stage != "infer" or item.done <= 1 or item.done >= item.total
                        if edge or now - last >= 1.0 / PROGRESS_HZ:
                            last = now
                            send("progress", item)
                    else:
                        prediction = item
            if prediction is None:
                raise RuntimeError("predict_iter ended without a Prediction")
        except Cancelled:
            outcomes.add("cancelled")
            raise
        except BaseException:
            outcomes.add("failed")
            raise
        outcomes.add("done")
        return prediction, (started, time.monotonic())

    async def run() -> None:
        try:
            send("done", await queue.run(work))
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # handed to the stream below, which says it in one line
            send("failed", error)

    with store.in_use(session):  # queued requests keep their session alive too
        task = asyncio.create_task(run())
        try:
            while True:
                try:
                    kind, item = await asyncio.wait_for(events.get(), HEARTBEAT_SECONDS)
                except asyncio.TimeoutError:
                    yield _line({"event": "waiting", "queue": queue.stats()})
                    continue
                if kind == "progress":
                    yield _line({"event": "progress", **dataclasses.asdict(item)})
                elif kind == "failed":
                    yield _line({"event": "error", **_error_fields(item)})
                    return
                else:
                    prediction, interval = item
                    yield _line(await _store_result(session, prediction, interval))
                    return
        finally:
            cancel.set()  # a no-op when the prediction ended; stops it at the next window when not
            if not task.done():
                task.cancel()


async def _store_result(
    session: CaseSession, prediction: Prediction, interval: tuple[float, float]
) -> dict[str, Any]:
    """Keep ``prediction``'s outputs in ``session`` (cut to the region it filled) and return the result line."""
    provenance = prediction.provenance
    assert provenance is not None  # predict_iter always sets it
    # The client learns which model ran by name and hash; the server's folders are none of its business.
    provenance = dataclasses.replace(
        provenance, model=dataclasses.replace(provenance.model, path=session.model_name)
    )
    box = None if provenance.roi is None else tuple(slice(a, b) for a, b in provenance.roi)
    npz = await asyncio.to_thread(prediction_to_npz, prediction, box)
    stored = StoredResult(id=secrets.token_urlsafe(12), npz=npz)
    session.result = stored
    return {
        "event": "result",
        "result": stored.id,
        "bytes": len(npz),
        "box": box_to_json(box),
        "provenance": provenance.to_dict(),
        "verdict": None if prediction.verdict is None else prediction.verdict.to_dict(),
        "run_interval": list(interval),
    }


def _error_fields(error: BaseException) -> dict[str, str]:
    if isinstance(error, MedclError):
        return {"error": str(error), "code": type(error).__name__}
    logger.error("prediction failed", exc_info=(type(error), error, error.__traceback__))
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return {
        "error": f"internal error on the server ({type(error).__name__}: {first}); its log has the traceback",
        "code": "internal_error",
    }


def _line(fields: dict[str, Any]) -> bytes:
    return (json.dumps(fields, default=_plain) + "\n").encode("utf-8")


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (in verdict details) as JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


async def _sweep_forever(store: SessionStore) -> None:
    """Drop idle sessions now and then, so an abandoned session's voxels do not wait for the next request."""
    interval = min(30.0, max(0.2, store.idle_timeout / 4))
    while True:
        await asyncio.sleep(interval)
        store.sweep()


def _peak_rss_bytes() -> int | None:
    """This process's peak resident memory (Linux and macOS report ru_maxrss in different units)."""
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
