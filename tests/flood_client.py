"""A healthy participant that floods a session, run as its own process.

The test suite's own process holds every module and fixture loaded so far; late in
a full run its full garbage collections take long enough to stall an in-process
client by half a second or more, which is the test harness falling behind, not the
server. A real participant is its own lean process (the `lsl` CLI, a browser tab),
so this one is too.

    python -m tests.flood_client WS_URL TOKEN MEGABYTES   → one JSON line on stdout
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from websockets.asyncio.client import connect

ACK_EVERY = 64 * 1024


def flood_command(mb: int) -> str:
    # The quotes split the markers so the shell's echo of the command line never matches them.
    return f"printf '%s\\n' ST''ART; yes | head -c {mb}M; printf '%s\\n' EN''D\r"


async def flood(ws_url: str, token: str, mb: int) -> dict[str, object]:
    """Join, run the flood, keep every live byte between the markers.

    A healthy participant must never be resynced: a snapshot after joining means it
    fell behind and the rest of the raw stream is gone for it."""
    async with connect(f"{ws_url}?client=cli", additional_headers={"Authorization": f"Token {token}"},
                       max_size=None, compression=None, max_queue=None) as ws:
        output, received, acked = bytearray(), 0, 0
        expect_snapshot, joined, started, scanned = False, False, None, 0
        elapsed = 0.0
        async for message in ws:
            if isinstance(message, str):
                if json.loads(message)["type"] == "snapshot":
                    if joined:
                        return {"resynced": True}
                    expect_snapshot = True
                continue
            received += len(message)
            if received - acked >= ACK_EVERY:
                acked = received
                await ws.send(json.dumps({"type": "ack", "bytes": received}))
            if expect_snapshot:  # the join snapshot's bytes: not part of the stream under test
                expect_snapshot, joined = False, True
                await ws.send(flood_command(mb).encode())
                continue
            output += message
            if started is None and b"START\r\n" in output[max(0, scanned - 8):]:
                started = time.monotonic()
            if started is not None and output.find(b"END\r\n", max(0, scanned - 8)) >= 0:
                elapsed = time.monotonic() - started
                break
            scanned = len(output)
        await ws.send(json.dumps({"type": "ack", "bytes": received}))
    data = bytes(output)
    begin = data.index(b"START\r\n") + len(b"START\r\n")
    body = data[begin:data.index(b"END\r\n", begin)]
    expected = b"y\r\n" * (mb * 1024 * 1024 // 2)
    mismatch = next((i for i, (a, b) in enumerate(zip(body, expected)) if a != b), None) if body != expected else None
    return {"resynced": False, "elapsed": elapsed, "bytes": len(body), "expected_bytes": len(expected),
            "intact": body == expected, "first_mismatch": mismatch}


if __name__ == "__main__":
    url, token, megabytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps(asyncio.run(asyncio.wait_for(flood(url, token, megabytes), 300))))
