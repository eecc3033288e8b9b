"""optuna-dashboard on a study database, live and read-only (``evomerge dashboard``).

The dashboard reads the trials through :class:`~evomerge.study.optuna_view.StudyStorageView`,
so it shows a running study as it goes (objectives, Pareto front, parameter importances,
parallel coordinates, per-trial metrics) without writing anything to the database.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from evomerge.errors import ConfigError
from evomerge.stop_signals import on_stop_signals

if TYPE_CHECKING:
    from evomerge.study.store import StudyStore


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would bury the URL; errors still reach stderr


READ_ONLY_REASON = (
    "read-only: this dashboard shows an evomerge study database; notes, tells and deletions "
    "are not stored (use the evomerge command to change studies)"
)


def read_only(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """Answer anything but GET and HEAD with 403 and a reason, before the dashboard sees it."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD", "GET") in ("GET", "HEAD"):
            return app(environ, start_response)
        body = json.dumps({"reason": READ_ONLY_REASON}).encode()
        start_response(
            "403 Forbidden",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return guarded


def make_dashboard_server(store: StudyStore, host: str, port: int) -> WSGIServer:
    """A WSGI server for the dashboard, bound (so the port is known) but not yet serving."""
    try:
        from optuna_dashboard import wsgi
    except ImportError:
        raise ConfigError(
            "optuna-dashboard is not installed: pip install 'optuna-dashboard>=0.17'"
        ) from None
    from evomerge.study.optuna_view import StudyStorageView

    logging.getLogger("optuna_dashboard").setLevel(logging.ERROR)
    app = read_only(wsgi(StudyStorageView(store)))
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: a port is a number from 0 to 65535")
    try:
        return make_server(host, port, app, handler_class=_QuietHandler)
    except socket.gaierror:
        raise ConfigError(f"--host {host}: not an address of this machine") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"--port {port}: something already listens on {host}:{port}; "
                "give another port (or 0 for a free one)"
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"--host {host}: not an address of this machine") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


FINISH_SECONDS = 10.0
"""How long a stop waits for the request being answered before it leaves anyway."""


def serve_until_stopped(server: WSGIServer, finish_seconds: float = FINISH_SECONDS) -> None:
    """Serve until SIGINT or SIGTERM, letting the request in progress finish.

    Requests are answered on a separate thread. A KeyboardInterrupt raised inside a request
    would be caught by wsgiref's error handler (a 500, and the server going on), and SIGTERM
    (``docker stop``) would kill the process mid-answer.
    """
    stop = threading.Event()
    serving = threading.Thread(target=server.serve_forever, name="dashboard", daemon=True)
    try:
        with on_stop_signals(lambda *_: stop.set()):
            serving.start()
            while not stop.wait(timeout=1.0):
                if not serving.is_alive():  # serve_forever itself failed; its error is on stderr
                    break
            # shutdown() waits for serve_forever to return; a client that never finishes
            # sending its request must not hold the stop, so it runs aside, waited for a while.
            threading.Thread(target=server.shutdown, daemon=True).start()
            serving.join(timeout=finish_seconds)
    finally:
        server.server_close()
