"""Running the app with uvicorn, on a socket bound here (a port in use is one clear error; port 0
picks a free one): in the foreground for ``tinyv serve`` (Ctrl-C stops it: answers in flight get
a few seconds, then the engine closes), or on a thread for tests and benchmarks."""
from __future__ import annotations

import ipaddress
import socket
import threading

from tinyv.errors import TinyVError
from tinyv.serve.app import ServerSettings, create_app

GRACE_S = 5  # after Ctrl-C, how long answers in flight may take before they are cut


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``, listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise TinyVError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _uvicorn_server(engine, settings: ServerSettings, started: threading.Event | None = None):
    try:
        import uvicorn
    except ImportError:
        raise TinyVError("tinyv serve needs its extra: pip install 'tinyv[serve]'") from None

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if started is not None:
                started.set()

    config = uvicorn.Config(create_app(engine, settings), log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=GRACE_S)
    return Server(config)


def serve_forever(engine, settings: ServerSettings, host: str, port: int, announce=print) -> None:
    """Serve until Ctrl-C (or SIGTERM), then close the engine."""
    server = _uvicorn_server(engine, settings)
    sock = bind(host, port)
    announce(f"tinyv serve: model {settings.model} at {url_of(sock)}/v1 "
             f"(batches of up to {settings.max_batch}{', API key required' if settings.api_key else ''}); "
             "Ctrl-C stops")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on
        pass
    finally:
        sock.close()
        engine.close()
    announce("tinyv serve: stopped")


class BackgroundServer:
    """The app on a thread of its own, on a free loopback port::

        with BackgroundServer(engine) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    """

    def __init__(self, engine, settings: ServerSettings = ServerSettings(), host: str = "127.0.0.1", port: int = 0):
        self._started = threading.Event()
        self.server = _uvicorn_server(engine, settings, self._started)
        self._sock = bind(host, port)
        self.url = url_of(self._sock)
        self.app = self.server.config.app
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="tinyv-serve", daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        while not self._started.wait(1):
            if not self._thread.is_alive():
                raise RuntimeError("the server thread ended before it started (see its log)")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join()
        self._sock.close()
