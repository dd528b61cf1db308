"""The client of medcl-serve: segment on another machine with the same calls and results as in-process.

    client = RemoteClient("https://seg.example.org", token)
    with client.open_session(volume, "brain-tissue-3d") as session:   # uploads the voxels once
        for item in session.predict_iter(region=(("slice", 0, 40))):  # Progress..., then a Prediction
            ...

``RemoteCaseSession.predict_iter`` yields ``napari_medcl.prediction.Progress`` events and then a
``napari_medcl.volume.Prediction`` on the client's Volume grid with its geometry, as the local
``predict_iter(volume, model, region=...)`` does: labels identical, maps within float16 precision
(``napari_medcl.transfer``), the verdict and the provenance of the server's run (with this volume's path and
format, which never left this machine). Only voxels, geometry and model names travel.

Faults are one line: every problem with the server (unreachable, wrong token, busy, killed mid-request)
is a ``ServerError``; a failed request leaves no half-built result. A session the server dropped (idle too
long, or the server restarted) is uploaded again once, transparently.

Only the standard library (``urllib``) and numpy: the client works in every napari-medcl install, with
nothing to add for the napari plugin's *Server* choice, and honours the system's proxy settings and TLS
certificates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import http.cookiejar
import ipaddress
import json
import math
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl import errors
from napari_medcl.errors import Cancelled, ServerError, UsageError
from napari_medcl.interactive import Update, bounding_box, labels_view
from napari_medcl.prediction import Progress, _cancel_check
from napari_medcl.prompts import Prompt, load_prompts, prompts_path, save_prompts
from napari_medcl.provenance import Provenance
from napari_medcl.review import RegionScore
from napari_medcl.spec import ModelSpec
from napari_medcl.transfer import (
    box_from_json,
    labels_from_npz,
    labels_to_npz,
    prediction_from_npz,
    volume_to_npz,
)
from napari_medcl.verdict import Verdict
from napari_medcl.volume import Prediction, Volume

__all__ = ["RemoteCaseSession", "RemoteClient", "RemoteModel", "SessionRestoredWarning"]

# The options of predict_iter the server takes (medcl-serve's app.CLIENT_OPTIONS); the device, backend and
# precision are the server's choice.
SERVER_OPTIONS = ("overlap", "tta", "batch_size", "return_probabilities", "scan_is_masked")
SERVER_CHOICES = ("device", "backend", "precision")
# Codes with which the server says a session is gone: the client uploads the image again.
SESSION_GONE = ("session_expired", "session_unknown")
# Codes of refusals that are the user's mistake (a prompt outside the image, no prediction yet): raised as the
# UsageError a local session raises, with the server's line.
USER_MISTAKES = ("bad_prompt", "bad_labels", "no_prediction", "bad_correction")
# What medcl-serve takes as a corrected case's name (app.CASE_ID_PATTERN).
_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Seconds to wait for the server when closing a session; closing is a courtesy (sessions also expire).
CLOSE_TIMEOUT = 5.0


class SessionRestoredWarning(UserWarning):
    """The server had dropped a session with prompts (idle too long, or restarted): the client uploaded the
    image again and replayed the session's predictions and prompts, so nothing was lost."""


class _Refusal(Exception):
    """An HTTP error answer of the server: status, its code and its one-line message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class RemoteClient:
    """A medcl-serve server at ``url`` (``http://`` or ``https://``), with the bearer ``token`` (None: a
    server started with --no-token). ``timeout``: seconds to wait for the server to answer or to send the
    next line (a prediction in progress sends one at least every few seconds)."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60.0):
        parsed = urllib.parse.urlsplit(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise UsageError(f"server URL must look like http://host:port or https://host, got {url!r}")
        self.url = url.strip().rstrip("/")
        self.token = token.strip() if token else None
        self.timeout = float(timeout)
        self._loopback = is_loopback(parsed.hostname)
        self._served: dict[str, Any] | None = None
        # A load balancer in front of several servers may pin a client to one with a cookie ("sticky
        # sessions"): kept here, so that a session's requests reach the server that holds its image.
        self._cookies = http.cookiejar.CookieJar()

    def __repr__(self) -> str:
        return f"RemoteClient({self.url!r})"

    def health(self) -> dict[str, Any]:
        """``{"status": "ok", "version": ...}``; ServerError when the server cannot be reached."""
        return self._json("GET", "/health")

    def models(self) -> dict[str, ModelSpec]:
        """The served models' specs, by the names to pass to ``open_session``."""
        self._served = self._json("GET", "/models")
        return {entry["name"]: ModelSpec.from_dict(entry["spec"]) for entry in self._served["models"]}

    def status(self) -> dict[str, Any]:
        """Sessions in use, the device queue and the server's peak memory (``GET /status``)."""
        return self._json("GET", "/status")

    def open_session(self, volume: Volume, model_name: str | None = None) -> RemoteCaseSession:
        """Upload ``volume`` (voxels and geometry only) for ``model_name`` (None: the server's default) and
        return the session; ServerError when the server refuses (unknown model, busy, too large)."""
        if not isinstance(volume, Volume):
            raise TypeError(f"volume must be a Volume, got {type(volume).__name__}")
        session = RemoteCaseSession(self, volume, model_name)
        session.upload()
        return session

    # -- HTTP

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        try:
            with self._open(method, path, data, "application/json") as response:
                return json.loads(self._read(response))
        except _Refusal as refusal:
            raise self._server_error(refusal) from None

    def _bytes(
        self, method: str, path: str, data: bytes | None = None, content_type: str | None = None
    ) -> bytes:
        with self._open(method, path, data, content_type) as response:
            return self._read(response)

    def _open(
        self,
        method: str,
        path: str,
        data: bytes | None = None,
        content_type: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """The server's response to one request (a context manager; read it, then close it). Raises
        _Refusal for an error answer, ServerError when there is no answer."""
        headers = {"Accept": "application/json, application/octet-stream"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if content_type is not None and data is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        # A server on this machine is never reached through a proxy, whatever http_proxy says.
        handlers: list[Any] = [urllib.request.HTTPCookieProcessor(self._cookies)]
        if self._loopback:
            handlers.append(urllib.request.ProxyHandler({}))
        opener = urllib.request.build_opener(*handlers)
        try:
            return opener.open(request, timeout=self.timeout if timeout is None else timeout)
        except urllib.error.HTTPError as error:
            raise self._refusal(error) from None
        except urllib.error.URLError as error:
            reason = error.reason
            raise ServerError(f"cannot reach the server at {self.url} ({_describe(reason)})") from None
        except (OSError, http.client.HTTPException) as error:
            raise self._lost(error) from None

    def _read(self, response: Any) -> bytes:
        try:
            return response.read()
        except (OSError, http.client.HTTPException) as error:
            raise self._lost(error) from None

    def _refusal(self, error: urllib.error.HTTPError) -> _Refusal:
        try:
            answer = json.loads(error.read() or b"{}")
            message, code = str(answer.get("error") or answer.get("detail")), str(answer.get("code", ""))
        except (ValueError, OSError, http.client.HTTPException, AttributeError):
            message, code = f"HTTP {error.code} {error.reason}", ""
        finally:
            error.close()
        return _Refusal(error.code, code, message)

    def _lost(self, error: BaseException) -> ServerError:
        return ServerError(
            f"the server at {self.url} stopped answering in the middle of a request ({_describe(error)}); "
            "nothing of that request was kept"
        )

    def _server_error(self, refusal: _Refusal) -> ServerError:
        return ServerError(f"server {self.url}: {refusal.message}")

    def _max_upload_bytes(self) -> int | None:
        if self._served is None:
            self.models()
        assert self._served is not None
        return self._served.get("max_upload_bytes")


class RemoteCaseSession:
    """One image uploaded to a server for one model: predict it whole or by regions, as often as needed, and
    correct it with prompts, as ``napari_medcl.interactive.CaseSession`` does in-process.

    The interactive part has the local session's interface: ``add_prompt(prompt)`` and ``undo()`` return an
    ``Update`` (the box of changed voxels on the 3D grid and the labels there: only that box travels; its
    ``seconds`` is the round trip), ``set_labels(labels)`` sends the box the user's brush changed,
    ``next_region()`` a ``RegionScore``, ``labels`` and ``prompts`` as they stand (kept here, updated from
    each answer), ``save_prompts`` / ``load_prompts``. The server keeps the probabilities and the history.

    ``spec``: the served model's spec; ``session_id``: the server's id for the upload (it changes when the
    image is uploaded again); ``uploads``: how many times the image was sent; ``restores``: how many times
    the server's state was rebuilt after it dropped the session, with ``notice`` saying the last. Close it
    (or use ``with``) to free the server's memory at once; the server also drops it after its idle timeout.
    """

    def __init__(self, client: RemoteClient, volume: Volume, model_name: str | None):
        self.client = client
        self.volume = volume
        self.model_name = model_name
        self.session_id: str | None = None
        self.spec: ModelSpec | None = None
        self.uploads = 0
        self.restores = 0
        self.notice: str | None = None
        # The server's clock (monotonic seconds) when its device ran the last prediction: start, end.
        self.last_server_run: tuple[float, float] | None = None
        shape = tuple(int(n) for n in volume.spatial_shape)
        self.grid: tuple[int, int, int] = shape if len(shape) == 3 else (1, *shape)  # type: ignore[assignment]
        self.prediction: Prediction | None = None
        self.prompts: list[Prompt] = []
        self._labels = np.zeros(self.grid, dtype=np.uint8)
        # What the server's session went through since the last whole-image prediction without prompts
        # (before it, nothing matters): ("predict", request), ("prompt", Prompt), ("labels", box, labels),
        # ("undo",). Replayed in order onto a new upload when the server dropped the session.
        self._log: list[tuple[Any, ...]] = []
        self._behind = False  # re-uploaded for a prediction: the log's earlier steps are not replayed yet
        self._labels_stale = False  # a prediction ended without its labels reaching this side
        self._replaying = False
        self._closer: weakref.finalize | None = None
        self._closed = False

    def __enter__(self) -> RemoteCaseSession:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def upload(self) -> None:
        """Send the image and open a (new) session for it on the server."""
        client = self.client
        data = volume_to_npz(self.volume)
        limit = client._max_upload_bytes()
        if limit is not None and len(data) > limit:
            raise ServerError(
                f"server {client.url}: the image is {len(data):,} bytes compressed, more than the server's "
                f"limit of {limit:,} (medcl-serve --max-upload-bytes)"
            )
        query = "" if self.model_name is None else "?" + urllib.parse.urlencode({"model": self.model_name})
        try:
            answer = json.loads(client._bytes("POST", "/sessions" + query, data, "application/octet-stream"))
        except _Refusal as refusal:
            raise client._server_error(refusal) from None
        self._forget()
        self.session_id = answer["session"]
        self.model_name = answer["model"]
        self.spec = ModelSpec.from_dict(answer["spec"])
        self.uploads += 1
        # A session left open (no close(), no with) is closed when this object goes, or at exit.
        self._closer = weakref.finalize(self, _close_quietly, client, self.session_id)

    def predict(self, region: Any = None, **options: Any) -> Prediction:
        """Run ``predict_iter`` to the end and return its Prediction."""
        result: Any = None
        for result in self.predict_iter(region=region, **options):  # noqa: B007  (the last item is the result)
            pass
        return result

    def predict_iter(
        self, region: Any = None, cancel: Any = None, **options: Any
    ) -> Iterator[Progress | Prediction]:
        """Progress events, then the Prediction of ``region`` (None: the whole image; a ``(start, stop)`` pair
        per spatial axis, or ``("slice", axis, index)``), as ``napari_medcl.prediction.predict_iter`` gives
        them. ``cancel``: a threading.Event or a callable, checked at every line from the server; when set,
        the server stops at its next window and Cancelled is raised. ``options``: overlap, tta, batch_size,
        return_probabilities, scan_is_masked. As with a local ``CaseSession``, the prompts so far are
        replayed onto the new labels (``labels``); the Prediction holds the model's own."""
        for key in options:
            if key in SERVER_CHOICES:
                raise UsageError(f"{key} is chosen by the server (medcl-serve --{key}), not by its clients")
            if key not in SERVER_OPTIONS:
                raise UsageError(
                    f"option {key!r} is not taken by the server (it takes {', '.join(SERVER_OPTIONS)})"
                )
        self._check_open()
        cancelled = _cancel_check(cancel)
        request = {"region": _region_to_json(region), "options": options}
        return self._predict_lines(request, cancelled)

    # -- the interactive session

    @property
    def labels(self) -> np.ndarray:
        """The labels as they stand, on the image's spatial grid (a view: do not write; use ``set_labels``)."""
        return labels_view(self._labels, self.volume.spatial_dims)

    def add_prompt(self, prompt: Prompt) -> Update:
        """Send one prompt (voxel indices (z, y, x) of the image's grid, z = 0 for a 2D image); the server
        refines the labels around it. UsageError, as in-process, for a prompt outside the image, a class the
        model does not have, or no prediction yet."""
        if not isinstance(prompt, Prompt):
            raise TypeError(f"prompt must be a napari_medcl.prompts.Prompt, got {type(prompt).__name__}")
        self._catch_up()
        start = time.perf_counter()
        body = json.dumps(prompt.to_dict()).encode("utf-8")
        answer = self._call("POST", "/prompts", body, "application/json")
        update = self._take_update(answer, start, prompt)
        self.prompts.append(prompt)
        self._record(("prompt", prompt))
        return update

    def undo(self) -> Update:
        """Take the last step back (a prompt or a ``set_labels``); ``changed`` 0 when there is nothing to undo."""
        self._catch_up()
        start = time.perf_counter()
        answer = self._call("POST", "/undo")
        update = self._take_update(answer, start, None)
        if self._log and self._log[-1][0] in ("prompt", "labels"):
            self._log.pop()  # that step and its undo: nothing left of either to replay
        else:
            self._log.append(("undo",))
        return update

    def set_labels(self, labels: np.ndarray) -> Update:
        """Take the user's own edits (a brush, an eraser): ``labels`` on the image's spatial grid. Only the
        box of voxels that differ from ``labels`` travels; one step that ``undo`` takes back."""
        labels = np.asarray(labels)
        on_grid = labels if self.volume.spatial_dims == 3 else labels[None]
        if on_grid.shape != self.grid:
            raise UsageError(f"labels of shape {on_grid.shape} do not fit the image's grid {self.grid}")
        self._catch_up()
        on_grid = on_grid.astype(self._labels.dtype, copy=False)
        box = bounding_box(on_grid != self._labels)
        if box is None:
            return Update(None, None, 0, 0.0)
        part = np.ascontiguousarray(on_grid[box])
        start = time.perf_counter()
        answer = self._call("PUT", "/labels", labels_to_npz(box, part), "application/octet-stream")
        _box, _labels, numbers = self._read_update(answer)
        self._labels[box] = part
        self._record(("labels", box, part))
        changed = int(numbers.get("changed", 0))
        return Update(box, part.copy(), changed, time.perf_counter() - start)

    def next_region(self, *, window_mm: float | None = None) -> RegionScore | None:
        """Where the model expects the most mistakes that no prompt has touched (``CaseSession.next_region``),
        worked out on the server; None when nothing is left."""
        self._catch_up()
        query = "" if window_mm is None else "?" + urllib.parse.urlencode({"window_mm": float(window_mm)})
        answer = json.loads(self._call("GET", "/next-region" + query))
        region = answer.get("region")
        if region is None:
            return None
        try:
            return RegionScore(
                box=tuple(slice(int(a), int(b)) for a, b in region["box"]),
                center=tuple(float(c) for c in region["center"]),
                score=float(region["score"]),
                expected_wrong_mm=float(region["expected_wrong_mm"]),
                voxels=int(region["voxels"]),
                labelled_voxels=int(region["labelled_voxels"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ServerError(
                f"server {self.client.url} sent a region this client cannot use ({error})"
            ) from None

    def save_prompts(self, labels_path: str | Path) -> Path:
        """Write the prompts beside the labels file (``prompts_path``), atomically, on this machine."""
        provenance = self.prediction.provenance if self.prediction is not None else None
        model = provenance.model.name if provenance is not None else None
        return save_prompts(prompts_path(labels_path), self.prompts, shape=self.grid, model=model)

    def load_prompts(self, path: str | Path) -> int:
        """Send the prompts saved at ``path`` (a prompts file on this machine, or the labels file they sit
        beside) after those already here; returns how many."""
        prompts = load_prompts(path, shape=self.grid)
        for prompt in prompts:
            self.add_prompt(prompt)
        return len(prompts)

    def add_correction(
        self,
        labels: np.ndarray | None = None,
        *,
        case_id: str | None = None,
        channel_names: list[str] | None = None,
    ) -> dict[str, Any]:
        """Add the labels as they stand (after ``set_labels(labels)`` when given: the user's last edits) to
        the server's corrections dataset (``medcl-serve --corrections-dir``; ``napari_medcl.corrections``) as
        the case ``case_id`` (a name: letters, digits, ``._-``; the server picks a dated one when None; a name
        used before replaces that case). Only the name travels: the server has the image, the model's labels
        and the corrected ones. Returns ``{"case_id", "replaced", "added_at", "changed_voxels"}``."""
        if case_id is not None and not _CASE_ID.fullmatch(str(case_id)):
            raise UsageError(f"case_id must be 1 to 100 letters, digits, '.', '_' or '-', got {case_id!r}")
        if labels is not None:
            self.set_labels(labels)
        self._catch_up()
        request: dict[str, Any] = {} if case_id is None else {"case_id": case_id}
        if channel_names is not None:
            request["channel_names"] = list(channel_names)
        body = json.dumps(request).encode("utf-8")
        return json.loads(self._call("POST", "/corrections", body, "application/json"))

    def close(self) -> None:
        """Close the session on the server (best effort: a server that is gone has dropped it anyway)."""
        self._closed = True
        if self._closer is not None:
            self._closer()
            self._closer = None

    # -- internals

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("this session is closed; open a new one (RemoteClient.open_session)")

    def _predict_lines(self, request: dict[str, Any], cancelled: Any) -> Iterator[Progress | Prediction]:
        start = time.perf_counter()
        response = self._start_prediction(request)
        self._labels_stale = True  # until this prediction's labels are here (a cancel may come too late)
        result = yield from self._result_line(response, cancelled)
        self._record(("predict", request))
        prediction = self._fetch(result, time.perf_counter() - start)
        self._take(prediction, result.get("box"))
        yield prediction

    def _result_line(self, response: Any, cancelled: Any) -> Generator[Progress, None, dict[str, Any]]:
        """The Progress lines of a prediction's answer, then (returned) its result line."""
        client = self.client
        try:
            while True:
                if cancelled():
                    raise Cancelled("prediction cancelled; the server stops at its next window")
                line = _read_line(client, response)
                if not line.endswith(b"\n"):  # the server went away before the end of a line
                    raise client._lost(EOFError("the answer ended before the result"))
                try:
                    event = json.loads(line)
                except ValueError:
                    raise ServerError(
                        f"server {client.url} sent a line that is not JSON: {line[:80]!r}"
                    ) from None
                kind = event.get("event")
                if kind == "progress":
                    yield Progress(event["done"], event["total"], event["stage"], event["elapsed"])
                elif kind == "error":
                    raise _error_from(event, client.url)
                elif kind == "result":
                    return event
        finally:
            response.close()  # when cancelled: the server sees the connection go and stops

    def _start_prediction(self, request: dict[str, Any]) -> Any:
        """The streaming answer of a predict request; the session is rebuilt once when the server says it is
        gone."""
        for attempt in (1, 2):
            try:
                data = json.dumps(request).encode("utf-8")
                return self.client._open(
                    "POST", f"/sessions/{self.session_id}/predict", data, "application/json"
                )
            except _Refusal as refusal:
                if refusal.code in SESSION_GONE and attempt == 1 and not self._replaying:
                    # Only predictions so far: their replay waits until a prompt needs it (maybe never).
                    self._restore(lazy=all(entry[0] == "predict" for entry in self._log))
                    continue
                raise self.client._server_error(refusal) from None
        raise AssertionError("unreachable")

    def _take(self, prediction: Prediction, box_json: Any) -> None:
        """This side's labels after the server's session took ``prediction``: its labels inside its region,
        or, when there are prompts (replayed onto them there), the server's labels."""
        if self.prompts:
            self._fetch_labels()
        else:
            labels = prediction.labels.array
            labels = labels if self.volume.spatial_dims == 3 else labels[None]
            if self.prediction is None:
                self._labels = np.zeros(self.grid, dtype=labels.dtype)
            inside: Any = (slice(None),) * 3
            if box_json is not None:
                inside = tuple(slice(int(a), int(b)) for a, b in box_json)
                inside = inside if self.volume.spatial_dims == 3 else (slice(0, 1), *inside)
            self._labels[inside] = labels[inside]
        self.prediction = prediction
        self._labels_stale = False

    def _fetch_labels(self) -> None:
        _box, labels, numbers = self._read_update(self._call("GET", "/labels"))
        if labels is None or labels.shape != self.grid:
            raise ServerError(f"server {self.client.url} sent labels that do not fit the image")
        self._labels = labels.copy()
        if int(numbers.get("prompts", len(self.prompts))) != len(self.prompts):
            self._fetch_prompts()

    def _fetch_prompts(self) -> None:
        answer = json.loads(self._call("GET", "/prompts"))
        try:
            self.prompts = [Prompt.from_dict(item) for item in answer["prompts"]]
        except (errors.MedclError, KeyError, TypeError, ValueError) as error:
            raise ServerError(
                f"server {self.client.url} sent prompts this client cannot use ({error})"
            ) from None

    def _take_update(self, answer: bytes, start: float, prompt: Prompt | None) -> Update:
        box, labels, numbers = self._read_update(answer)
        if box is not None and labels is not None:
            self._labels[box] = labels
        held = int(numbers.get("prompts", 0))
        expected = len(self.prompts) + (prompt is not None)
        if prompt is None and held <= len(self.prompts):
            del self.prompts[held:]  # an undo of a prompt takes it off the list
        elif held != expected:
            self._fetch_prompts()  # out of step (should not happen): the server's list is the truth
        seconds = time.perf_counter() - start
        if box is None:
            return Update(None, None, int(numbers.get("changed", 0)), seconds, prompt)
        return Update(box, labels, int(numbers.get("changed", 0)), seconds, prompt)  # type: ignore[arg-type]

    def _read_update(self, answer: bytes) -> tuple[Any, Any, dict[str, float]]:
        try:
            # uint16 labels of the whole grid at most: a broken server cannot make this side allocate more
            return labels_from_npz(answer, self.grid, max_bytes=2 * math.prod(self.grid))
        except errors.MedclError as error:
            raise ServerError(
                f"server {self.client.url} sent an update this client cannot use ({error})"
            ) from None

    def _record(self, entry: tuple[Any, ...]) -> None:
        if self._replaying:
            return
        if entry[0] == "predict" and entry[1]["region"] is None and not self.prompts:
            # A whole-image prediction without prompts sets every voxel: nothing before it needs replaying.
            self._log = [entry]
            self._behind = False
        else:
            self._log.append(entry)

    def _call(
        self, method: str, suffix: str, data: bytes | None = None, content_type: str | None = None
    ) -> bytes:
        """One request about this session; the session is rebuilt once when the server says it is gone."""
        self._check_open()
        for attempt in (1, 2):
            try:
                return self.client._bytes(method, f"/sessions/{self.session_id}{suffix}", data, content_type)
            except _Refusal as refusal:
                if refusal.code in SESSION_GONE and attempt == 1 and not self._replaying:
                    self._restore(lazy=False)
                    continue
                if refusal.code in USER_MISTAKES:
                    raise UsageError(refusal.message) from None
                raise self.client._server_error(refusal) from None
        raise AssertionError("unreachable")

    def _catch_up(self) -> None:
        """Before a prompt: the server's session replays what a lazy re-upload skipped, and this side gets the
        labels a prediction that ended early may have left behind."""
        self._check_open()
        if self._behind:
            self._replay(self._log, stacklevel=4)
            self._behind = False
        if self._labels_stale:
            self._fetch_labels()
            self._labels_stale = False

    def _restore(self, *, lazy: bool) -> None:
        """Upload the image again and (unless ``lazy``) replay the log onto the new session: the server is
        where it was, this side's labels and prompts unchanged. Said once, as a warning and in ``notice``."""
        log = list(self._log)
        self.upload()
        self.restores += 1
        if lazy:
            self._behind = bool(log)
            return
        self._behind = False
        self._replay(log, stacklevel=6)

    def _replay(self, log: list[tuple[Any, ...]], *, stacklevel: int) -> None:
        """Send ``log``'s steps to the server's session again, in order; warn (at the caller ``stacklevel``
        frames up) when it held more than predictions."""
        counts = {"predict": 0, "prompt": 0, "labels": 0, "undo": 0}
        self._replaying = True
        try:
            for entry in log:
                kind = entry[0]
                counts[kind] += 1
                if kind == "predict":
                    response = self._start_prediction(entry[1])
                    for _progress in self._result_line(response, lambda: False):
                        pass
                elif kind == "prompt":
                    self._call(
                        "POST", "/prompts", json.dumps(entry[1].to_dict()).encode(), "application/json"
                    )
                elif kind == "labels":
                    self._call(
                        "PUT", "/labels", labels_to_npz(entry[1], entry[2]), "application/octet-stream"
                    )
                else:
                    self._call("POST", "/undo")
        finally:
            self._replaying = False
        if counts["prompt"] or counts["labels"] or counts["undo"]:
            self.notice = (
                f"server {self.client.url} had dropped this session (idle too long, or restarted): the image "
                f"was uploaded again, {counts['predict']} prediction(s) re-run and {counts['prompt']} "
                f"prompt(s) and {counts['labels']} edit(s) replayed"
            )
            warnings.warn(self.notice, SessionRestoredWarning, stacklevel=stacklevel)

    def _fetch(self, event: dict[str, Any], seconds: float) -> Prediction:
        """The Prediction of a result line: its outputs fetched and put on this volume's grid."""
        client, spec = self.client, self.spec
        assert spec is not None
        try:
            data = client._bytes("GET", f"/sessions/{self.session_id}/results/{event['result']}")
        except _Refusal as refusal:
            raise client._server_error(refusal) from None
        try:
            box = box_from_json(event.get("box"), self.volume.spatial_shape)
            prediction = prediction_from_npz(
                data, self.volume, uncertainty_maps=spec.uncertainty_maps, box=box
            )
            provenance = Provenance.from_dict(event["provenance"])
        except (errors.MedclError, KeyError, TypeError, ValueError) as error:
            raise ServerError(f"server {client.url} sent a result this client cannot use ({error})") from None
        # What only this machine knows: where the scan came from. And where the model ran.
        provenance = dataclasses.replace(
            provenance,
            input=dataclasses.replace(
                provenance.input,
                path=None if self.volume.source is None else str(self.volume.source),
                format=self.volume.format,
            ),
            model=dataclasses.replace(provenance.model, path=f"{client.url}/models/{self.model_name}"),
            timings={**provenance.timings, "remote_round_trip": round(seconds, 4)},
        )
        self.last_server_run = tuple(event["run_interval"]) if "run_interval" in event else None
        verdict = None if event.get("verdict") is None else Verdict.from_dict(event["verdict"])
        return dataclasses.replace(prediction, provenance=provenance, verdict=verdict)

    def _forget(self) -> None:
        """Stop the closing of the previous session at exit (it is gone, or being replaced)."""
        if self._closer is not None:
            self._closer.detach()
            self._closer = None


class RemoteModel:
    """A served model used where the napari widget uses a local one: ``predict_iter(volume, ...)`` opens a
    session for each image it is given and keeps it (the ``keep`` most recent), so that predicting the same
    image again, whole or by regions, does not upload it again."""

    def __init__(self, client: RemoteClient, name: str, *, keep: int = 4):
        self.client = client
        self.name = name
        self.keep = keep
        self._sessions: OrderedDict[str, RemoteCaseSession] = OrderedDict()
        self._spec: ModelSpec | None = None

    @property
    def spec(self) -> ModelSpec:
        if self._spec is None:
            specs = self.client.models()
            if self.name not in specs:
                raise ServerError(
                    f"server {self.client.url} does not serve {self.name!r} (it serves {', '.join(specs)})"
                )
            self._spec = specs[self.name]
        return self._spec

    def predict_iter(
        self, volume: Volume, *, region: Any = None, cancel: Any = None, **options: Any
    ) -> Iterator[Any]:
        return self.session_for(volume).predict_iter(region=region, cancel=cancel, **options)

    def session_for(self, volume: Volume) -> RemoteCaseSession:
        """The open session holding ``volume`` (same voxels and geometry), opened now if there is none."""
        # The very Volume of a session (the widget's run, then its prompt panel) needs no hashing.
        key = next((k for k, s in self._sessions.items() if s.volume is volume), None)
        key = key or volume_fingerprint(volume)
        session = self._sessions.pop(key, None)
        if session is None:
            session = self.client.open_session(volume, self.name)
            self._spec = session.spec
        self._sessions[key] = session
        while len(self._sessions) > self.keep:
            self._sessions.popitem(last=False)[1].close()
        return session

    def close(self) -> None:
        while self._sessions:
            self._sessions.popitem()[1].close()


def volume_fingerprint(volume: Volume) -> str:
    """A hash of ``volume``'s voxels, dtype, shape and geometry: the same image gives the same string."""
    digest = hashlib.blake2b(digest_size=16)
    array = np.ascontiguousarray(volume.array)
    digest.update(
        repr((array.shape, array.dtype.str, volume.channel_axis, volume.spacing, volume.origin)).encode()
    )
    digest.update(np.asarray(volume.direction, dtype=np.float64).tobytes())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _close_quietly(client: RemoteClient, session_id: str) -> None:
    try:
        with client._open("DELETE", f"/sessions/{session_id}", timeout=CLOSE_TIMEOUT):
            pass
    except (_Refusal, ServerError):
        pass


def _read_line(client: RemoteClient, response: Any) -> bytes:
    try:
        return response.readline()
    except (OSError, http.client.HTTPException) as error:
        raise client._lost(error) from None


def _error_from(event: dict[str, Any], url: str) -> errors.MedclError:
    """The error the server's prediction ended with, as the class a local run would raise when it is one of
    the user's (PredictionError for a model's NaN, UsageError for an option...); ServerError otherwise."""
    message, code = str(event.get("error", "the prediction failed")), str(event.get("code", ""))
    if code in ("UsageError", "PredictionError", "Cancelled"):
        return getattr(errors, code)(message)
    if code in ("InputError", "ModelError"):
        return getattr(errors, code)(None, message)
    return ServerError(f"server {url}: {message}")


def _region_to_json(region: Any) -> Any:
    """``region`` as JSON: None, ["slice", axis, index] or [[start, stop], ...] (slices become pairs)."""
    if region is None:
        return None
    if isinstance(region, tuple | list) and len(region) == 3 and region[0] == "slice":
        return ["slice", int(region[1]), int(region[2])]
    if isinstance(region, str) or not isinstance(region, tuple | list):
        raise UsageError(
            f"region must be None, ('slice', axis, index) or (start, stop) pairs, got {region!r}"
        )
    pairs = []
    for item in region:
        start, stop = (item.start, item.stop) if isinstance(item, slice) else item
        pairs.append([None if start is None else _whole(start), None if stop is None else _whole(stop)])
    return pairs


def _whole(value: Any) -> int:
    if not float(value).is_integer():
        raise UsageError(f"region: {value!r} is not a whole voxel index")
    return int(value)


def _describe(reason: Any) -> str:
    if isinstance(reason, socket.timeout | TimeoutError):
        return "no answer in time"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused: is medcl-serve running there?"
    text = str(reason).strip().splitlines()[0] if str(reason).strip() else ""
    return f"{type(reason).__name__}: {text}" if text else type(reason).__name__


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
