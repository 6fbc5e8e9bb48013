"""Run envd: `python3 -m envd` inside a sandbox (as root), on 0.0.0.0:49983."""

from __future__ import annotations

import argparse
import asyncio

import uvicorn

from . import PORT
from .app import create_app
from .state import EnvdState


def main() -> None:
    parser = argparse.ArgumentParser(prog="envd")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--default-user", default="user")
    parser.add_argument(
        "--identity",
        action="store_true",
        help="inside a sandbox: /init gives it its own /etc/machine-id",
    )
    args = parser.parse_args()
    app = create_app(EnvdState(default_user=args.default_user, identity=args.identity))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            access_log=False, timeout_keep_alive=300, http="h11",
                            # Attached process streams must not hold up a stop.
                            timeout_graceful_shutdown=2)  # fmt: skip
    asyncio.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
