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
- The interactive session (``napari_medcl.interactive``) of the scan, once it has a prediction; each step
  answers with a labels update (``transfer.labels_to_npz``: the box of changed voxels on the 3D grid, the
  labels there, ``changed``, ``seconds`` on the server, ``prompts`` now held), never the whole map:
  ``POST /sessions/{id}/prompts`` with JSON ``Prompt.to_dict()`` adds a prompt; ``GET`` the same path lists
  them (JSON); ``POST /sessions/{id}/undo`` takes the last step back; ``PUT /sessions/{id}/labels`` with a
  labels update (box + labels, uint8 or uint16) takes the user's brush edits (answered without the labels,
  which the client has); ``GET /sessions/{id}/labels`` sends the whole labels map as one update (a client
  catching up); ``GET /sessions/{id}/next-region?window_mm=`` says where the model expects the most
  mistakes no prompt has touched (JSON, null when none). They run on the device queue like predictions.
- ``POST /sessions/{id}/corrections`` with JSON ``{"case_id": ..., "channel_names": [...]}`` (both optional):
  the session's labels as they stand become a case of the corrections dataset (``napari_medcl.corrections``)
  in the server's ``--corrections-dir``, compared with the model's own labels to record what the user
  changed; answers the case id, whether it replaced one, and the changed voxels. The client names a case,
  never a path; without ``--corrections-dir`` it is refused (403 corrections_off).
- ``DELETE /sessions/{id}``: close the session.

Every refusal is ``{"error": one line, "code": ...}`` with a fitting status (400 bad request, 401 token,
404 unknown model or session, 409 no prediction to refine yet, 410 session expired, 413 upload too large,
503 busy). A prompt's or labels' problems are ``bad_prompt`` / ``bad_labels`` with the interactive session's
own message, so that the client raises the UsageError a local session would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import re
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from napari_medcl import __version__
from napari_medcl.errors import Cancelled, MedclError
from napari_medcl.interactive import Update
from napari_medcl.prediction import Progress
from napari_medcl.prompts import KINDS, Prompt
from napari_medcl.region import plan_for_model
from napari_medcl.serve.device_queue import DeviceQueue
from napari_medcl.serve.served_models import NAME_PATTERN, ServedModels
from napari_medcl.serve.sessions import Refused, ServerSession, SessionStore, StoredResult
from napari_medcl.transfer import (
    box_to_json,
    labels_from_npz,
    labels_to_npz,
    prediction_to_npz,
    volume_from_npz,
)
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
# A prompt's voxels at most: a long scribble on a slice is a few thousand; more is a mistake or an attack
# (each is a JSON number to parse and a voxel to refine around).
MAX_PROMPT_VOXELS = 100_000
MAX_PROMPT_BYTES = 4 * 1024**2
PROMPT_KEYS = frozenset({"kind", "label", "voxels", "positive"})
CASE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Seconds between lines of a prediction's answer at most (a "waiting" line when nothing else was sent):
# proxies close connections that stay silent (nginx after 60 s), and the client notices a dead server.
HEARTBEAT_SECONDS = 5.0
# Progress lines per second at most: a model with thousands of small windows would otherwise send thousands.
PROGRESS_HZ = 10.0


@dataclass(frozen=True)
class ServerSettings:
    """What ``medcl-serve``'s options set. ``token``: the bearer token clients must send (None: no token,
    loopback only; the command checks that). ``max_upload_bytes`` bounds a request body as sent;
    ``max_voxel_bytes`` an uploaded image once unpacked. ``idle_timeout`` in seconds. ``corrections_dir``:
    the corrections dataset clients add corrected cases to (None: they cannot)."""

    device: str = "auto"
    token: str | None = None
    max_sessions: int = 16
    max_upload_bytes: int = 512 * 1024**2
    max_voxel_bytes: int = 2 * 1024**3
    idle_timeout: float = 600.0
    corrections_dir: Path | None = None


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

    @router.post("/sessions/{session_id}/prompts")
    async def add_prompt(session_id: str, request: Request) -> Response:
        session = store.get(session_id)
        prompt = _prompt_from_json(await _read_body(request, MAX_PROMPT_BYTES), session)

        def work() -> bytes:
            _need_prediction(session)
            return _update_npz(session, _interactive(session.case.add_prompt, prompt, code="bad_prompt"))

        return _npz(await _on_session(session, store, queue, work))

    @router.get("/sessions/{session_id}/prompts")
    async def list_prompts(session_id: str) -> dict[str, Any]:
        session = store.get(session_id)
        return {"prompts": [prompt.to_dict() for prompt in list(session.case.prompts)]}

    @router.post("/sessions/{session_id}/undo")
    async def undo(session_id: str) -> Response:
        session = store.get(session_id)
        return _npz(
            await _on_session(session, store, queue, lambda: _update_npz(session, session.case.undo()))
        )

    @router.put("/sessions/{session_id}/labels")
    async def edit_labels(session_id: str, request: Request) -> Response:
        session = store.get(session_id)
        body = await _read_body(request, settings.max_upload_bytes)
        try:
            # uint16 labels of the whole grid at most: no upload unpacks into more than that
            box, labels, _numbers = await asyncio.to_thread(
                labels_from_npz, body, session.case.grid, max_bytes=2 * math.prod(session.case.grid)
            )
        except MedclError as error:
            raise Refused(400, "bad_labels", f"labels refused: {error}") from None
        if box is None or labels is None:
            raise Refused(400, "bad_labels", "labels refused: send a box and the labels inside it")

        def work() -> bytes:
            update = _interactive(session.case.edit_labels, box, labels, code="bad_labels")
            return _update_npz(session, update, with_labels=False)  # the client sent them

        return _npz(await _on_session(session, store, queue, work))

    @router.get("/sessions/{session_id}/labels")
    async def labels(session_id: str) -> Response:
        session = store.get(session_id)

        def work() -> bytes:
            case = session.case
            whole = tuple(slice(0, n) for n in case.grid)
            labels = case.labels if case.volume.spatial_dims == 3 else case.labels[None]
            return labels_to_npz(whole, labels, prompts=len(case.prompts))

        return _npz(await _on_session(session, store, queue, work))

    @router.get("/sessions/{session_id}/next-region")
    async def next_region(session_id: str, window_mm: float | None = None) -> dict[str, Any]:
        session = store.get(session_id)
        if window_mm is not None and not (np.isfinite(window_mm) and window_mm > 0):
            raise Refused(400, "bad_request", f"window_mm must be a positive number of mm, got {window_mm}")

        def work() -> Any:
            _need_prediction(session)
            return session.case.next_region(window_mm=window_mm)

        region = await _on_session(session, store, queue, work)
        if region is None:
            return {"region": None}
        return {
            "region": {
                "box": box_to_json(region.box),
                "center": [float(c) for c in region.center],
                "score": float(region.score),
                "expected_wrong_mm": float(region.expected_wrong_mm),
                "voxels": int(region.voxels),
                "labelled_voxels": int(region.labelled_voxels),
            }
        }

    @router.post("/sessions/{session_id}/corrections", status_code=201)
    async def add_corrected_case(session_id: str, request: Request) -> dict[str, Any]:
        session = store.get(session_id)
        if settings.corrections_dir is None:
            raise Refused(
                403,
                "corrections_off",
                "this server keeps no corrections dataset (start it with medcl-serve --corrections-dir DIR)",
            )
        case_id, channel_names = _parse_correction(await _read_body(request, MAX_JSON_BYTES))

        def snapshot() -> tuple[np.ndarray, np.ndarray, Any]:
            _need_prediction(session)
            assert session.model_labels is not None  # set with the first prediction
            provenance = session.case.prediction.provenance
            # The record names the served model as clients know it, not the server's folders.
            provenance = dataclasses.replace(
                provenance, model=dataclasses.replace(provenance.model, path=session.model_name)
            )
            return session.case.labels.copy(), session.model_labels.copy(), provenance

        labels, model_labels, provenance = await _on_session(session, store, queue, snapshot)
        from napari_medcl.corrections import CorrectionError, add_correction
        from napari_medcl.errors import OutputError

        try:
            # Written off the device queue (disk, not GPU), under the dataset's own lock.
            added = await asyncio.to_thread(
                add_correction,
                settings.corrections_dir,
                session.volume,
                labels,
                model=provenance,
                model_labels=model_labels,
                case_id=case_id,
                channel_names=channel_names,
            )
        except CorrectionError as error:
            raise Refused(400, "bad_correction", str(error)) from None
        except OutputError as error:
            logger.error("cannot add a corrected case: %s", error)  # the path is for the server's log only
            raise Refused(
                500,
                "corrections_write_failed",
                f"the server could not write the corrected case ({error.problem})",
            ) from None
        return {
            "case_id": added.case_id,
            "replaced": added.replaced,
            "added_at": added.record["added_at"],
            "changed_voxels": added.record["changed"]["voxels"],
        }

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


def _parse_predict(body: bytes, session: ServerSession) -> tuple[Any, dict[str, Any]]:
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


def _prompt_from_json(body: bytes, session: ServerSession) -> Prompt:
    """The Prompt of an add-prompt request, checked field by field before anything runs: Refused (400
    path_refused for anything naming a path, bad_prompt for the rest)."""
    try:
        data = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Refused(400, "bad_request", "the prompt is not JSON") from None
    if not isinstance(data, dict):
        raise Refused(400, "bad_prompt", 'a prompt is {"kind", "label", "voxels", "positive"}')
    if any(isinstance(v, str) and ("/" in v or "\\" in v) for v in [*data, *_flatten(data)]):
        raise Refused(400, "path_refused", "the server reads no files; the prompt names a path")
    if set(data) - PROMPT_KEYS or not {"kind", "label", "voxels"} <= set(data):
        raise Refused(
            400, "bad_prompt", f"a prompt has the fields kind, label, voxels and positive, got {sorted(data)}"
        )
    kind, label, voxels = data["kind"], data["label"], data["voxels"]
    positive = data.get("positive", True)
    if kind not in KINDS:
        raise Refused(400, "bad_prompt", f"prompt kind must be one of {', '.join(KINDS)}, got {kind!r}")
    num_classes = session.model.spec.num_classes
    if not _whole_number(label) or not 0 <= label < num_classes:
        raise Refused(
            400, "bad_prompt", f"class {label!r} is not one of the model's classes (0..{num_classes - 1})"
        )
    if not isinstance(positive, bool):
        raise Refused(400, "bad_prompt", f"positive must be true or false, got {positive!r}")
    if not isinstance(voxels, list) or not 1 <= len(voxels) <= MAX_PROMPT_VOXELS:
        raise Refused(
            400, "bad_prompt", f"a prompt's voxels are a list of 1 to {MAX_PROMPT_VOXELS:,} [z, y, x] indices"
        )
    if not all(isinstance(v, list) and len(v) == 3 and all(map(_whole_number, v)) for v in voxels):
        raise Refused(400, "bad_prompt", "a prompt's voxels must be [z, y, x] whole-number indices")
    try:
        prompt = Prompt(kind, label, np.asarray(voxels, dtype=np.int64), positive)
        prompt.check_inside(session.case.grid)
    except MedclError as error:
        raise Refused(400, "bad_prompt", str(error)) from None
    return prompt


def _parse_correction(body: bytes) -> tuple[str, list[str] | None]:
    """(case id, channel names or None) of an add-correction request; Refused for anything else. A case id
    is a name (letters, digits, ``._-``), never a path; none given: a new one, dated."""
    try:
        data = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Refused(400, "bad_request", "the correction request is not JSON") from None
    if not isinstance(data, dict):
        raise Refused(400, "bad_request", 'a correction request is {"case_id": ..., "channel_names": [...]}')
    if any(isinstance(v, str) and ("/" in v or "\\" in v or ".." in v) for v in [*data, *_flatten(data)]):
        raise Refused(400, "path_refused", "the server writes where it was told to; name a case, not a path")
    if set(data) - {"case_id", "channel_names"}:
        raise Refused(
            400, "bad_request", f"a correction request has case_id and channel_names, got {sorted(data)}"
        )
    case_id = data.get("case_id")
    if case_id is None:
        case_id = f"case-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
    if not isinstance(case_id, str) or not CASE_ID_PATTERN.fullmatch(case_id):
        raise Refused(
            400, "bad_request", f"case_id must be 1 to 100 letters, digits, '.', '_' or '-', got {case_id!r}"
        )
    names = data.get("channel_names")
    if names is not None and (
        not isinstance(names, list)
        or not all(isinstance(n, str) and CASE_ID_PATTERN.fullmatch(n) for n in names)
    ):
        raise Refused(400, "bad_request", "channel_names must be a list of names (letters, digits, '._-')")
    return case_id, names


def _whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _need_prediction(session: ServerSession) -> None:
    if session.case.prediction is None:
        raise Refused(
            409,
            "no_prediction",
            "run the model on this case first (session.predict()); prompts refine its result",
        )


def _interactive(step: Any, *args: Any, code: str) -> Update:
    """``step(*args)`` of the interactive session; its user errors as Refused (400 ``code``)."""
    try:
        return step(*args)
    except MedclError as error:
        raise Refused(400, code, str(error)) from None


def _update_npz(session: ServerSession, update: Update, *, with_labels: bool = True) -> bytes:
    return labels_to_npz(
        update.box,
        update.labels if with_labels else None,
        changed=update.changed,
        seconds=update.seconds,
        prompts=len(session.case.prompts),
    )


def _npz(data: bytes) -> Response:
    return Response(data, media_type="application/octet-stream")


async def _on_session(session: ServerSession, store: SessionStore, queue: DeviceQueue, work: Any) -> Any:
    """``work()`` on the device queue, holding ``session``'s lock (nothing else of that session runs
    meanwhile) and keeping it from expiring while it waits; anything but a Refused is logged and said in one
    line (500 internal_error)."""

    def locked() -> Any:
        with session.lock:
            return work()

    with store.in_use(session):
        try:
            return await queue.run(locked)
        except Refused:
            raise
        except Exception as error:
            fields = _error_fields(error)
            status = 400 if isinstance(error, MedclError) else 500
            raise Refused(status, fields["code"], fields["error"]) from None


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
    session: ServerSession,
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
            with store.in_use(session), session.lock:
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
    session: ServerSession, prediction: Prediction, interval: tuple[float, float]
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
