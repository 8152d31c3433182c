"""An HTTP receiver on 127.0.0.1 for a remote store's object events (SeaweedFS, MinIO, S3 via a relay, GCS push)."""

from __future__ import annotations

import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Translator = Callable[[dict, dict], list[str]]


class EventReceiver:
    """Collects POSTed event bodies and turns them into store keys with a translator; drain() hands them over."""

    def __init__(self, translate: Translator, port: int = 0, host: str = "127.0.0.1") -> None:
        self._q: queue.Queue = queue.Queue()
        self.received = 0
        self.translate = translate
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                if length > 10 * 1024 * 1024:
                    self.send_error(413, "event body too large")
                    return
                body = self.rfile.read(length)
                try:
                    payload = json.loads(body or b"{}")
                except json.JSONDecodeError:
                    self.send_error(400, "event body is not JSON")
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.received += 1
                receiver._q.put((time.time(), payload if isinstance(payload, dict) else {"items": payload}, headers))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:  # events are counted, not logged per request
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}/events"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fedkeeper-events", daemon=True)

    def start(self) -> "EventReceiver":
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def drain(self) -> list[dict]:
        """Events received so far, as [{"key": ..., "time": ...}] with keys relative to the store root."""
        out = []
        while True:
            try:
                at, payload, headers = self._q.get_nowait()
            except queue.Empty:
                return out
            try:
                for key in self.translate(payload, headers):
                    out.append({"key": key, "time": at})
            except (KeyError, TypeError, ValueError):
                continue  # a malformed event is dropped; the deadline tick still closes the round

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
