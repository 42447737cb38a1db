"""Watch the live updates: connect to ``/ws/signatures/``, create a signature through
the API, and print what the websocket pushes (the signature, read from a replica that
has replayed the write, and which alias served it).

    python live_client.py [http://127.0.0.1:8001] [count]
"""

import json
import sys
import time
import uuid

import httpx
from websockets.sync.client import connect

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8001"
count = int(sys.argv[2]) if len(sys.argv) > 2 else 5

with connect(base.replace("http", "ws", 1) + "/ws/signatures/", open_timeout=10) as ws:
    time.sleep(0.2)  # the consumer joins its group
    for _ in range(count):
        name = f"live-{uuid.uuid4().hex[:8]}"
        created = httpx.post(f"{base}/api/signatures/", json={"name": name}).json()
        pushed = json.loads(ws.recv(timeout=10))
        found = pushed["signature"] is not None
        print(f"created {created['id']}: pushed by {pushed['alias']}, found={found}")
