"""``python -m engines serve``: one process, FastAPI + uvicorn in front, the scheduler thread behind.

uvicorn owns SIGINT/SIGTERM while it runs: the listening socket closes at once (new connections are refused),
requests in flight - streams included - run to their end for up to ``GRACEFUL_SECONDS``, then the scheduler stops.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
from dataclasses import dataclass

from ..artifacts import ExportArtifact
from ..errors import EngineError, check_counts
from ..runtime import DecoderRuntime
from .scheduler import Scheduler

__all__ = ["GRACEFUL_SECONDS", "ServeOptions", "serve"]

GRACEFUL_SECONDS = 8  # in-flight requests get this long after SIGTERM; the process exits within 10 s


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (printed when ready)
    max_batch: int = 8
    max_waiting: int = 256
    max_prefill_tokens: int = 2048
    served_model_name: str | None = None
    api_key: str | None = None
    max_body_bytes: int = 2 * 2**20


def _imports():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as error:
        raise EngineError(f"`serve` needs the serve extra ({error.name} is missing): pip install '.[serve]'.") \
            from None
    return uvicorn


def check_options(options: ServeOptions) -> None:
    check_counts(options, ("max_batch", "max_waiting", "max_prefill_tokens", "max_body_bytes"))
    if not 0 <= options.port <= 65535:
        raise EngineError(f"--port must be in [0, 65535], got {options.port}.")
    if options.api_key is not None and not options.api_key.strip():
        raise EngineError("--api-key must not be empty.")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or an EngineError saying why the address cannot be used."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise EngineError(f"--host {host!r} cannot be resolved ({error.strerror}).") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise EngineError(f"cannot listen on {host}:{port} ({error.strerror}); pick another --port (0 = any free "
                          "one).") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(runtime: DecoderRuntime, artifact: ExportArtifact, tokenizer, options: ServeOptions) -> int:
    """Serve until SIGINT/SIGTERM; 0 on a clean shutdown."""
    uvicorn = _imports()
    from .app import ServerConfig, build_app

    check_options(options)
    name = options.served_model_name or artifact.folder.resolve().name
    sock = bind(options.host, options.port)
    scheduler = Scheduler(runtime, tokenizer.decode, max_batch=options.max_batch, max_waiting=options.max_waiting,
                          max_prefill_tokens=options.max_prefill_tokens).start()
    app = build_app(scheduler, tokenizer, ServerConfig(name, options.api_key, options.max_body_bytes))
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SECONDS,
                            access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {name} ({runtime.describe()}, max batch {options.max_batch}) on http://{shown}:{port}/v1",
          file=sys.stderr, flush=True)
    with _signals_recorded() as received:  # uvicorn re-raises the signal it shut down on: record it, don't die
        try:
            server.run(sockets=[sock])
        finally:
            scheduler.stop()
            sock.close()
    why = f" ({signal.Signals(received[0]).name})" if received else ""
    print(f"server stopped{why}.", file=sys.stderr, flush=True)
    return 0


@contextlib.contextmanager
def _signals_recorded():
    """SIGINT/SIGTERM recorded instead of acted on while uvicorn runs (it handles them itself, then re-raises)."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda number, _frame: received.append(number))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
