"""Many participants of one session in one process, for the crowd test (tests/test_sessions_scale.py).

    python -m tests.crowd_client WS_URL TOKEN COUNT DEADLINE_SECONDS

Prints `ready` once all COUNT have their join snapshot, then (after a flood with time markers
`M=<epoch seconds>` and an `END` line) one JSON line: for each participant, the largest lag of a
marker delivered live (receive time minus the time the shell printed it), how many `lagging`
frames and resync snapshots it got, whether it was closed as too slow, and whether it saw END
(live, or on a snapshot). Every wait is bounded by DEADLINE_SECONDS.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from typing import Any

from websockets.asyncio.client import connect

ACK_EVERY = 16 * 1024
ACK_IDLE = 0.05  # and when nothing came for this long (docs/protocol.md, flow control)
HANDSHAKES: asyncio.Semaphore
MARKER = re.compile(rb"M=(\d+\.\d+)")  # matched against whole lines


async def participant(url: str, token: str, joined: asyncio.Event, joined_count: list[int], count: int,
                      deadline: float) -> dict[str, Any]:
    report: dict[str, Any] = {"max_lag": 0.0, "markers": 0, "lagging": 0, "resyncs": 0, "too_slow": False, "end": False}
    async with HANDSHAKES:  # people arrive over seconds, not in one burst of SYNs past the listen backlog
        ws = await connect(f"{url}?client=other", additional_headers={"Authorization": f"Token {token}"},
                           max_size=None, compression=None, max_queue=None, open_timeout=30)
    async with ws:
        received = acked = 0
        snapshot_next, snapshots, tail = False, 0, b""
        while time.time() < deadline:
            idle = ACK_IDLE if received > acked else max(0.1, deadline - time.time())
            try:
                message = await asyncio.wait_for(ws.recv(), idle)
            except asyncio.TimeoutError:
                if received > acked:  # output paused: ack what we have, as real clients do
                    acked = received
                    await ws.send(json.dumps({"type": "ack", "bytes": received}))
                    continue
                break
            except Exception as exc:  # closed: say how
                report["closed"] = f"{exc.__class__.__name__}: {exc}"[:200]
                break
            now = time.time()
            if isinstance(message, str):
                frame = json.loads(message)
                if frame["type"] == "snapshot":
                    snapshot_next = True
                    snapshots += 1
                elif frame["type"] == "lagging":
                    report["lagging"] += 1
                elif frame["type"] == "error" and frame.get("code") == "too_slow":
                    report["too_slow"] = True
                continue
            received += len(message)
            if received - acked >= ACK_EVERY or snapshot_next:
                acked = received
                await ws.send(json.dumps({"type": "ack", "bytes": received}))
            if snapshot_next:
                snapshot_next = False
                if snapshots == 1:
                    joined_count[0] += 1
                    if joined_count[0] == count:
                        joined.set()
                else:
                    report["resyncs"] += 1
                if b"END" in message.replace(b"EN''D", b""):
                    report["end"] = True
                    break
                tail = b""
                continue
            lines = (tail + message).split(b"\n")
            for line in lines[:-1]:  # whole lines only: a marker is a line of its own
                match = MARKER.fullmatch(line.strip())
                if match:
                    report["markers"] += 1
                    report["max_lag"] = max(report["max_lag"], now - float(match.group(1)))
                elif line.strip() == b"END":
                    report["end"] = True
            if report["end"]:
                break
            tail = lines[-1][-64:]  # a long line of flood is of no interest past its end
    return report


async def main(url: str, token: str, count: int, seconds: float) -> list[dict[str, Any]]:
    global HANDSHAKES
    HANDSHAKES = asyncio.Semaphore(10)
    deadline = time.time() + seconds
    joined, joined_count = asyncio.Event(), [0]
    tasks = [asyncio.create_task(participant(url, token, joined, joined_count, count, deadline)) for _ in range(count)]
    waiter = asyncio.create_task(joined.wait())
    await asyncio.wait([waiter, *tasks], timeout=max(1.0, deadline - time.time()), return_when=asyncio.FIRST_COMPLETED)
    print("ready" if joined.is_set() else "not ready", flush=True)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return [r if isinstance(r, dict) else {"error": repr(r)} for r in results]


if __name__ == "__main__":
    ws_url, api_token, n, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    print(json.dumps(asyncio.run(main(ws_url, api_token, n, limit))), flush=True)
