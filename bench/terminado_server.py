"""The terminado baseline for bench/terminal.py, in its own process (so its CPU can be measured).

    python bench/terminado_server.py --port PORT --container CONTAINER_ID

A tornado server with one shared terminal (terminado's SingleTermManager) whose shell is
`docker exec -it -e TERM=xterm-256color CONTAINER /bin/bash`, served at ws://127.0.0.1:PORT/websocket.
Prints `ready` once it listens; runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil

import tornado.web
from terminado import SingleTermManager, TermSocket


async def serve(port: int, container: str) -> None:
    docker = shutil.which("docker") or "docker"
    manager = SingleTermManager(shell_command=[docker, "exec", "-it", "-e", "TERM=xterm-256color", container, "/bin/bash"])
    app = tornado.web.Application([(r"/websocket", TermSocket, {"term_manager": manager})])
    app.listen(port, "127.0.0.1")
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--container", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.container))
