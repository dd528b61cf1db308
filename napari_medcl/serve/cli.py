"""medcl-serve: serve models to napari viewers (and Python clients) on other machines.

Arguments, the token and start-up only: the service is ``napari_medcl.serve.app``. The server binds to
127.0.0.1 unless told otherwise: anything listening on a network address can be reached by every machine
on that network, and images of patients must not be; put TLS in front (a reverse proxy) before opening it.

Heavy modules (fastapi, uvicorn, onnxruntime) are imported after argument parsing, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
from pathlib import Path

from napari_medcl import __version__
from napari_medcl.arg_types import real_number, whole_number
from napari_medcl.crash_log import internal_error_message
from napari_medcl.errors import MedclError, UsageError

PROG = "medcl-serve"
# The shortest token accepted from a file: 128 bits as URL-safe base64, what a new token file gets.
MIN_TOKEN_CHARS = 22


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve segmentation models over HTTP to napari-medcl viewers and Python clients "
        "(napari_medcl.remote.RemoteClient): a client uploads a scan's voxels and geometry once, then asks for "
        "predictions of the whole image or of regions. Predictions run one at a time on the device.",
        epilog="Every request but GET /health needs 'Authorization: Bearer <token>' with the token in "
        "--token-file (created with a new random token when the file does not exist). The server binds to "
        "127.0.0.1 by default: to serve other machines, put a reverse proxy with TLS in front (see the "
        "README, 'Serving models to several viewers') rather than --host 0.0.0.0. Batch work on cohorts "
        "stays medcl-predict.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument(
        "--port",
        type=whole_number(0, 65535, what="a port number"),
        default=8765,
        help="port (0: any free port; default: 8765)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        metavar="DIR_OR_NAME",
        help="folders of .onnx files (each served under its file name without .onnx) and bundled model names "
        "(default: every bundled model)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")
    parser.add_argument(
        "--backend",
        choices=("auto", "onnxruntime", "openvino"),
        default="auto",
        help="inference engine, as for medcl-predict (default: auto)",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="as for medcl-predict (default: auto)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="file holding the bearer token clients must send; a new random one is written there (mode 600) "
        "when the file does not exist",
    )
    parser.add_argument(
        "--no-token",
        action="store_true",
        help="accept requests without a token: for development on this machine only (refused unless --host "
        "is a loopback address)",
    )
    parser.add_argument(
        "--max-sessions",
        type=whole_number(1),
        default=16,
        metavar="N",
        help="open sessions at most (default: 16)",
    )
    parser.add_argument(
        "--max-upload-bytes",
        type=whole_number(1),
        default=512 * 1024**2,
        metavar="N",
        help="largest request body accepted, compressed as sent (default: 536870912, 512 MiB)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=real_number(0.0, what="a number of seconds", low_open=True),
        default=600.0,
        metavar="S",
        help="close a session after S seconds without a request; its client then uploads again (default: 600)",
    )
    parser.add_argument(
        "--corrections-dir",
        type=Path,
        metavar="DIR",
        help="corrections dataset (napari_medcl.corrections, the layout medcl-train reads) where clients add "
        "their corrected cases (POST /sessions/{id}/corrections); created when missing. Default: none, and "
        "the server refuses corrected cases",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        token = _token(args)
        sock = _bind(args.host, args.port)
    except MedclError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    try:
        return _serve(args, token, sock)
    except KeyboardInterrupt:
        return 130
    except MedclError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        print(f"{PROG}: {internal_error_message(PROG, error)}", file=sys.stderr)
        return 1


def _serve(args: argparse.Namespace, token: str | None, sock: socket.socket) -> int:
    import uvicorn

    from napari_medcl.serve.app import ServerSettings, create_app
    from napari_medcl.serve.served_models import load_served_models

    models = load_served_models(
        args.models, device=args.device, backend=args.backend, precision=args.precision
    )
    settings = ServerSettings(
        device=args.device,
        token=token,
        max_sessions=args.max_sessions,
        max_upload_bytes=args.max_upload_bytes,
        idle_timeout=args.idle_timeout,
        corrections_dir=None if args.corrections_dir is None else args.corrections_dir.expanduser().resolve(),
    )
    app = create_app(models, settings)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    providers = sorted({model.provider for model in models.sessions.values()})
    # Tests and scripts read this line for the port (with --port 0).
    print(
        f"{PROG} {__version__}: serving {', '.join(models.names)} on {', '.join(providers)} at "
        f"http://{url_host}:{port} ({'token required' if token else 'NO TOKEN: loopback development only'})",
        flush=True,
    )
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _token(args: argparse.Namespace) -> str | None:
    """The token from --token-file (a new one written there when the file does not exist), or None with
    --no-token on a loopback host. UsageError for any other combination."""
    from napari_medcl.remote import is_loopback

    if args.no_token:
        if args.token_file is not None:
            raise UsageError("--no-token and --token-file exclude each other")
        if not is_loopback(args.host):
            raise UsageError(
                f"--no-token is for development on this machine: refused with --host {args.host} (use --token-file)"
            )
        return None
    if args.token_file is None:
        raise UsageError(
            "pass --token-file FILE (a new token is written there if it does not exist), or --no-token"
        )
    path = args.token_file.expanduser()
    if not path.exists():
        token = secrets.token_urlsafe(32)
        try:
            # O_EXCL and mode 600: no other user ever sees the file, even for a moment.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as file:
                file.write(token + "\n")
        except OSError as error:
            raise UsageError(f"--token-file {path}: cannot create it ({error.strerror or error})") from None
        print(
            f"{PROG}: wrote a new token to {path}; give it to the viewers that may use this server",
            flush=True,
        )
        return token
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--token-file {path}: cannot read it ({error})") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise UsageError(
            f"--token-file {path}: the token must be one word of at least {MIN_TOKEN_CHARS} characters "
            "(delete the file and a new random one is written)"
        )
    return token


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (bound here, so --port 0 gets a free port we can print)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        if os.name != "nt":  # on Windows it would let another process take the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        raise UsageError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
    sock.set_inheritable(True)
    return sock
