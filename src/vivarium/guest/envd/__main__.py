"""Run envd: `python3 -m envd` inside a sandbox (as root), on 0.0.0.0:49983."""

from __future__ import annotations

import argparse
import asyncio

from . import PORT
from .app import create_app
from .serving import QuietServer, config
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
    asyncio.run(QuietServer(config(app, args.host, args.port)).serve())


if __name__ == "__main__":
    main()
