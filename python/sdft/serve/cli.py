"""``sdft serve`` / ``python -m sdft.serve``: run the server with uvicorn.

Prints the URL (with the port actually bound, also for ``--port 0``) and where the API key came
from once it accepts connections. Heavy imports (torch, starlette, uvicorn) happen only when the
command runs.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from sdft.models import DEFAULT_MODEL

    parser.add_argument(
        "--host",
        default=None,
        help=f"address to bind (default {DEFAULT_HOST}; a non-loopback "
        "address needs a key that is not the default)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port (default {DEFAULT_PORT}; 0 = any free port)",
    )
    parser.add_argument(
        "--checkpoint-root",
        default=None,
        help="where checkpoints are written (default <sdft cache>/serve-checkpoints)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument(
        "--models",
        nargs="+",
        default=[DEFAULT_MODEL],
        metavar="MODEL",
        help="base models served: HF ids, local dirs, .gguf files, sdft/tiny-random "
        f"(default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--api-key", default=None, help="the key clients must send (else $SDFT_SERVE_API_KEY)"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="delay every response (for benchmarks)"
    )
    parser.add_argument(
        "--max-body-mb", type=float, default=256.0, help="largest request body (default 256 MB)"
    )
    parser.add_argument(
        "--session-timeout",
        type=float,
        default=300.0,
        help="drop a session silent for this many seconds (default 300)",
    )
    parser.add_argument("--log-level", default="warning", help="uvicorn log level")


def cmd_serve(args: argparse.Namespace) -> int:
    from sdft.models import cache_root
    from sdft.redact import install_log_redaction, register_secret
    from sdft.serve.app import ServeConfig, create_app, describe_models
    from sdft.serve.auth import check_bind, resolve_api_key

    key = resolve_api_key(args.api_key, os.environ)
    # uvicorn's and the server's log records, and every error body, never show the key
    install_log_redaction()
    register_secret(key.value)
    host = args.host or DEFAULT_HOST
    check_bind(host, args.host is not None, key)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_body_mb <= 0 or args.latency_ms < 0 or args.session_timeout <= 0:
        raise ValueError("--max-body-mb and --session-timeout must be > 0, --latency-ms >= 0")
    root = Path(args.checkpoint_root or cache_root() / "serve-checkpoints").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    config = ServeConfig(
        models=list(args.models),
        api_key=key,
        checkpoint_root=root.resolve(),
        device=args.device,
        dtype=args.dtype,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        latency_ms=args.latency_ms,
        session_timeout_s=args.session_timeout,
        served=describe_models(list(args.models)),
    )
    app = create_app(config)
    sock = _bind(host, args.port)
    port = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    lines = [
        f"sdft serve: listening on http://{shown_host}:{port}",
        f"sdft serve: API key: {key.describe()}",
        f"sdft serve: models: {', '.join(config.served)}",
        f"sdft serve: checkpoints: {root}",
    ]
    from sdft.serve.auth import is_loopback

    if not is_loopback(host):
        lines.append(
            f"sdft serve: WARNING: bound to the non-loopback address {host}; anyone who can reach "
            "it and holds the key can train and sample (plain HTTP: use a TLS proxy or a tunnel)"
        )
    _serve(app, sock, lines, args.log_level)
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _serve(app: Any, sock: socket.socket, ready_lines: list[str], log_level: str) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                print("\n".join(ready_lines), flush=True)

    config = uvicorn.Config(
        app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5, lifespan="on"
    )
    Server(config).run(sockets=[sock])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sdft.serve",
        description="A Tinker-compatible HTTP server on sdft's local backend.",
    )
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_serve(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("SDFT_DEBUG", "") not in ("", "0"):
            raise
        from sdft.redact import redact

        print(f"sdft serve: error: {redact(str(exc))}", file=sys.stderr)
        return 2
