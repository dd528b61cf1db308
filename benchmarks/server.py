"""medcl-serve under load: concurrent clients on loopback against in-process prediction of the same requests.

    .venv/bin/python benchmarks/server.py [--clients 8] [--requests 20] [--clicks 40] [--model brain-tissue-2d]
        [--slices 6]

Starts ``medcl-serve`` on 127.0.0.1 (a free port, a throw-away token) serving ``--model``, and takes a small
real volume: ``--slices`` axial slices from the middle of the bundled sample scan
(``napari_medcl/data/mni152_t1_2mm.nii.gz``), or of ``--image``. Then:

1. **Server**: ``--clients`` threads, each with its own ``RemoteClient`` and session (one upload), send
   ``--requests`` predictions each, all at once: every fifth the whole volume, the others one slice or a box,
   different for each client. Errors (must be 0), latency p50/p95 (queueing included: the device runs one
   prediction at a time), throughput, the uploads, the server's peak RSS.
2. **In-process**: the same requests, one after the other, through ``napari_medcl.predict`` with the same model
   loaded in this process: the time the device needs for them.
3. **Overhead**: server wall time over in-process time (1.0 = none; both phases run one after the other, so
   the load of a shared machine moves it), and per request: one client alone (no queue), each request sent to
   the server and then run in-process, the median and p95 of the differences.
4. **Clicks**: one client alone, after a whole-volume prediction, ``--clicks`` point prompts (a third
   negative on a random labelled voxel, the others a random class at a random voxel) and as many undos, each sent to the server and then answered by an
   in-process ``CaseSession`` on the same prediction: the round trip of a click on loopback against the
   in-process step, the bytes an answer holds, and whether the labels stayed identical.

Bounded: the clients stop starting requests after ``--max-seconds`` (default 60), and the report says how many
ran; the in-process pass repeats only those, so the whole run stays under 4 minutes. Writes ``benchmarks/results/server.json`` (``--out``). Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_medcl import __version__, load_model, predict, read_image  # noqa: E402
from napari_medcl.atomic import write_text_atomic  # noqa: E402
from napari_medcl.demo import sample_path  # noqa: E402
from napari_medcl.interactive import open_session  # noqa: E402
from napari_medcl.prompts import point  # noqa: E402
from napari_medcl.remote import RemoteClient  # noqa: E402
from napari_medcl.transfer import labels_to_npz  # noqa: E402


def requests_for(client: int, count: int, shape: tuple[int, ...]) -> list[Any]:
    """The regions client ``client`` asks for: every fifth the whole volume (None), else a slice or a box."""
    z, y, x = shape
    regions: list[Any] = []
    for i in range(count):
        k = client * count + i
        if i % 5 == 0:
            regions.append(None)
        elif i % 2:
            regions.append(("slice", 0, k % z))
        else:
            y0, x0 = (7 * k) % (y // 2), (5 * k) % (x // 2)
            regions.append(((0, z), (y0, y0 + y // 2), (x0, x0 + x // 2)))
    return regions


def start_server(model: str, device: str, token_file: Path) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable, "-m", "napari_medcl.serve", "--host", "127.0.0.1", "--port", "0",
        "--models", model, "--device", device, "--token-file", str(token_file), "--max-sessions", "64",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert process.stdout is not None
    for line in process.stdout:
        if " at http://127.0.0.1:" in line:
            return process, line.split(" at ")[1].split()[0]
    raise RuntimeError(f"medcl-serve did not start (exit status {process.wait()})")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20, help="per client")
    parser.add_argument("--model", default="brain-tissue-2d", help="a bundled model name")
    parser.add_argument("--image", type=Path, default=None, help="default: the bundled sample scan")
    parser.add_argument(
        "--slices", type=int, default=6, help="axial slices kept from the middle of the scan (default: 6)"
    )
    parser.add_argument(
        "--clicks", type=int, default=40, help="point prompts of the clicks phase (default: 40)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--max-seconds", type=float, default=60.0, help="clients start no request after this (default: 60)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "server.json")
    args = parser.parse_args()

    scan = read_image(args.image or sample_path())
    middle = scan.spatial_shape[0] // 2
    volume = scan.crop(
        (slice(middle - args.slices // 2, middle - args.slices // 2 + args.slices),) + (slice(None),) * 2
    )
    plans = [requests_for(c, args.requests, volume.spatial_shape) for c in range(args.clients)]
    model = load_model(args.model, device=args.device)
    predict(volume, model, region=("slice", 0, 0))  # warm-up, as the server's first request was

    with tempfile.TemporaryDirectory() as folder:
        token_file = Path(folder) / "token"
        token = secrets.token_urlsafe(32)
        token_file.write_text(token)
        process, url = start_server(args.model, args.device, token_file)
        try:
            server = run_clients(url, token, args.model, volume, plans, args.max_seconds)
            alone = run_alone(url, token, args.model, volume, plans[0], model)
            clicks = run_clicks(url, token, args.model, volume, model, args.clicks)
            status = RemoteClient(url, token).status()
        finally:
            process.terminate()
            process.wait(timeout=30)

    ran = [plans[c][: server["done_per_client"][c]] for c in range(args.clients)]
    local_latencies = []
    start = time.perf_counter()
    for plan in ran:
        for region in plan:
            t = time.perf_counter()
            predict(volume, model, region=region)
            local_latencies.append(time.perf_counter() - t)
    local_seconds = time.perf_counter() - start
    extra = [remote - local for remote, local in alone]

    report = {
        "benchmark": "benchmarks/server.py",
        "version": __version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "model": args.model,
        "provider": model.provider,
        "volume": {
            "shape": list(volume.spatial_shape),
            "dtype": str(volume.array.dtype),
            "source": "middle slices of " + (str(args.image) if args.image else "the bundled sample"),
        },
        "clients": args.clients,
        "requests_per_client": args.requests,
        "requests_done": server["done"],
        "errors": server["errors"],
        "error_examples": server["error_examples"][:3],
        "upload_seconds_median": round(statistics.median(server["uploads"]), 4),
        "server": {
            "wall_seconds": round(server["wall"], 2),
            "throughput_per_second": round(server["done"] / server["wall"], 2),
            "latency_p50_seconds": round(percentile(server["latencies"], 50), 3),
            "latency_p95_seconds": round(percentile(server["latencies"], 95), 3),
            "peak_rss_mib": round(status["peak_rss_bytes"] / 2**20, 1),
            "peak_running_on_device": status["queue"]["peak_running"],
        },
        "in_process": {
            "wall_seconds": round(local_seconds, 2),
            "throughput_per_second": round(len(local_latencies) / local_seconds, 2),
            "latency_p50_seconds": round(percentile(local_latencies, 50), 3),
            "latency_p95_seconds": round(percentile(local_latencies, 95), 3),
        },
        "overhead": {
            "wall_ratio_server_over_in_process": round(server["wall"] / local_seconds, 3),
            "one_client_median_seconds": round(statistics.median(r for r, _ in alone), 4),
            "in_process_median_seconds": round(statistics.median(lo for _, lo in alone), 4),
            "per_request_median_ms": round(1000 * statistics.median(extra), 1),
            "per_request_p95_ms": round(1000 * percentile(extra, 95), 1),
        },
        "clicks": clicks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if server["errors"] or not clicks["labels_identical"]:
        sys.exit(1)


def run_clients(
    url: str, token: str, model: str, volume: Any, plans: list[list[Any]], max_seconds: float
) -> dict[str, Any]:
    """Every client at once, each in its own thread with its own session; latencies of the predictions."""
    latencies: list[float] = []
    uploads: list[float] = []
    errors: list[str] = []
    done = [0] * len(plans)
    lock = threading.Lock()
    start = time.perf_counter()

    def client(index: int) -> None:
        try:
            t = time.perf_counter()
            with RemoteClient(url, token).open_session(volume, model) as session:
                with lock:
                    uploads.append(time.perf_counter() - t)
                for region in plans[index]:
                    if time.perf_counter() - start > max_seconds:
                        return
                    t = time.perf_counter()
                    try:
                        session.predict(region=region)
                    except Exception as error:  # counted: the benchmark reports errors, it does not stop
                        with lock:
                            errors.append(f"client {index}: {error}")
                        continue
                    with lock:
                        latencies.append(time.perf_counter() - t)
                        done[index] += 1
        except Exception as error:
            with lock:
                errors.append(f"client {index}: {error}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(plans))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {
        "latencies": latencies,
        "uploads": uploads or [float("nan")],
        "errors": len(errors),
        "error_examples": errors,
        "done": sum(done),
        "done_per_client": done,
        "wall": wall,
    }


def run_alone(
    url: str, token: str, model_name: str, volume: Any, plan: list[Any], model: Any
) -> list[tuple[float, float]]:
    """One client's requests with no other client, each followed by the same request in-process: (remote,
    in-process) seconds per request. Interleaved, so the load of a shared machine weighs on both alike."""
    pairs = []
    with RemoteClient(url, token).open_session(volume, model_name) as session:
        for region in plan:
            t = time.perf_counter()
            session.predict(region=region)
            remote = time.perf_counter() - t
            t = time.perf_counter()
            predict(volume, model, region=region)
            pairs.append((remote, time.perf_counter() - t))
    return pairs


def run_clicks(url: str, token: str, model_name: str, volume: Any, model: Any, count: int) -> dict[str, Any]:
    """``count`` point prompts, then as many undos, on a server session and on an in-process CaseSession
    holding the same prediction, one after the other: round trip against in-process step, in seconds."""
    rng = np.random.default_rng(0)
    local = open_session(volume, model)
    local.predict()
    remote_seconds, local_seconds, undo_seconds, answer_bytes, changed = [], [], [], [], []
    identical = True
    with RemoteClient(url, token).open_session(volume, model_name) as session:
        session.predict()
        identical &= bool(np.array_equal(session.labels, local.labels))
        labelled = np.argwhere(local.labels > 0) if volume.spatial_dims == 3 else None
        for i in range(count):
            if i % 3 == 0 and labelled is not None and len(labelled):  # "not this class", on a labelled voxel
                voxel = [int(v) for v in labelled[rng.integers(len(labelled))]]
                prompt = point(*voxel, label=int(local.labels[tuple(voxel)]), positive=False)
            else:
                voxel = [int(rng.integers(n)) for n in session.grid]
                prompt = point(*voxel, label=int(rng.integers(1, model.spec.num_classes)))
            t = time.perf_counter()
            update = session.add_prompt(prompt)
            remote_seconds.append(time.perf_counter() - t)
            t = time.perf_counter()
            local.add_prompt(prompt)
            local_seconds.append(time.perf_counter() - t)
            changed.append(update.changed)
            # what the answer carried: the box and its labels (the same .npz the server wrote)
            answer_bytes.append(
                len(labels_to_npz(update.box, update.labels, changed=1, seconds=1.0, prompts=1))
            )
            identical &= bool(np.array_equal(session.labels, local.labels))
        for _ in range(count):
            t = time.perf_counter()
            session.undo()
            undo_seconds.append(time.perf_counter() - t)
            local.undo()
        identical &= bool(np.array_equal(session.labels, local.labels))
    extra = [r - lo for r, lo in zip(remote_seconds, local_seconds)]
    return {
        "clicks": count,
        "labels_identical": identical,
        "voxels_changed_median": statistics.median(changed),
        "answer_bytes_median": statistics.median(answer_bytes),
        "labels_map_bytes": int(np.prod(session.grid)),
        "round_trip_p50_ms": round(1000 * percentile(remote_seconds, 50), 1),
        "round_trip_p95_ms": round(1000 * percentile(remote_seconds, 95), 1),
        "in_process_p50_ms": round(1000 * percentile(local_seconds, 50), 1),
        "in_process_p95_ms": round(1000 * percentile(local_seconds, 95), 1),
        "overhead_median_ms": round(1000 * statistics.median(extra), 1),
        "undo_round_trip_p50_ms": round(1000 * percentile(undo_seconds, 50), 1),
    }


if __name__ == "__main__":
    main()
