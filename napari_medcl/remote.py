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
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np

from napari_medcl import errors
from napari_medcl.errors import Cancelled, ServerError, UsageError
from napari_medcl.prediction import Progress, _cancel_check
from napari_medcl.provenance import Provenance
from napari_medcl.spec import ModelSpec
from napari_medcl.transfer import box_from_json, prediction_from_npz, volume_to_npz
from napari_medcl.verdict import Verdict
from napari_medcl.volume import Prediction, Volume

__all__ = ["RemoteCaseSession", "RemoteClient", "RemoteModel"]

# The options of predict_iter the server takes (medcl-serve's app.CLIENT_OPTIONS); the device, backend and
# precision are the server's choice.
SERVER_OPTIONS = ("overlap", "tta", "batch_size", "return_probabilities", "scan_is_masked")
SERVER_CHOICES = ("device", "backend", "precision")
# Codes with which the server says a session is gone: the client uploads the image again.
SESSION_GONE = ("session_expired", "session_unknown")
# Seconds to wait for the server when closing a session; closing is a courtesy (sessions also expire).
CLOSE_TIMEOUT = 5.0


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
    """One image uploaded to a server for one model: predict it whole or by regions, as often as needed.

    ``spec``: the served model's spec; ``session_id``: the server's id for the upload (it changes when the
    image is uploaded again); ``uploads``: how many times the image was sent. Close it (or use ``with``)
    to free the server's memory at once; the server also drops it after its idle timeout."""

    def __init__(self, client: RemoteClient, volume: Volume, model_name: str | None):
        self.client = client
        self.volume = volume
        self.model_name = model_name
        self.session_id: str | None = None
        self.spec: ModelSpec | None = None
        self.uploads = 0
        # The server's clock (monotonic seconds) when its device ran the last prediction: start, end.
        self.last_server_run: tuple[float, float] | None = None
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
        return_probabilities, scan_is_masked."""
        for key in options:
            if key in SERVER_CHOICES:
                raise UsageError(f"{key} is chosen by the server (medcl-serve --{key}), not by its clients")
            if key not in SERVER_OPTIONS:
                raise UsageError(
                    f"option {key!r} is not taken by the server (it takes {', '.join(SERVER_OPTIONS)})"
                )
        if self._closed:
            raise UsageError("this session is closed; open a new one (RemoteClient.open_session)")
        cancelled = _cancel_check(cancel)
        request = {"region": _region_to_json(region), "options": options}
        return self._predict_lines(request, cancelled)

    def close(self) -> None:
        """Close the session on the server (best effort: a server that is gone has dropped it anyway)."""
        self._closed = True
        if self._closer is not None:
            self._closer()
            self._closer = None

    # -- internals

    def _predict_lines(self, request: dict[str, Any], cancelled: Any) -> Iterator[Progress | Prediction]:
        client = self.client
        start = time.perf_counter()
        response = self._start_prediction(request)
        result = None
        try:
            while result is None:
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
                    result = event
        finally:
            response.close()  # when cancelled: the server sees the connection go and stops
        yield self._fetch(result, time.perf_counter() - start)

    def _start_prediction(self, request: dict[str, Any]) -> Any:
        """The streaming answer of a predict request; the image is uploaded again once when the server says
        the session is gone."""
        for attempt in (1, 2):
            try:
                data = json.dumps(request).encode("utf-8")
                return self.client._open(
                    "POST", f"/sessions/{self.session_id}/predict", data, "application/json"
                )
            except _Refusal as refusal:
                if refusal.code in SESSION_GONE and attempt == 1:
                    self.upload()
                    continue
                raise self.client._server_error(refusal) from None
        raise AssertionError("unreachable")

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
        key = volume_fingerprint(volume)
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
