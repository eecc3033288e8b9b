"""``evomerge dashboard``: optuna-dashboard on a study database, live and read-only."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from evomerge.cli.args import add_storage

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def add_commands(commands: Any) -> None:
    """Register ``dashboard``."""
    dashboard = commands.add_parser(
        "dashboard",
        help="open optuna-dashboard on a study database (live, read-only)",
        description="Serve optuna-dashboard over the studies in a database: objectives, the "
        "Pareto front, parameter importances and every trial's metrics, refreshed as a "
        "running study records results. Nothing is written to the database. It listens on "
        "127.0.0.1 unless --host says otherwise; reach it from elsewhere through an SSH tunnel.",
    )
    add_storage(dashboard)
    dashboard.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})"
    )
    dashboard.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port to listen on (default {DEFAULT_PORT}; 0 picks a free one)",
    )
    dashboard.set_defaults(handler=cmd_dashboard)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from evomerge.study.dashboard import make_dashboard_server, serve_until_stopped
    from evomerge.study.read import open_store
    from evomerge.study.store import mask_url

    store = open_store(args.storage)
    names = [row["name"] for row in store.studies()]
    server = make_dashboard_server(store, args.host, args.port)
    host, port = server.server_address[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    print(
        f"optuna-dashboard on {mask_url(store.url)} ({len(names)} studies: "
        f"{', '.join(names) or 'none yet'})",
        flush=True,
    )
    print(f"open http://{shown}:{port}/dashboard  (Ctrl-C stops; read-only)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"note: listening on {host}: anyone who can reach port {port} can read these "
            "studies; prefer 127.0.0.1 and an SSH tunnel",
            file=sys.stderr,
            flush=True,
        )
    serve_until_stopped(server)
    print("dashboard stopped", file=sys.stderr)
    return 0
