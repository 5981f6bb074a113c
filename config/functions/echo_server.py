#!/usr/bin/env python3
"""An `http` function: a small long-running HTTP server.

The gateway starts one process per replica and gives it its port in PORT. It is ready
once GET /_/health answers 200 (the path of OpenFaaS's watchdogs). Every other request
is answered with a JSON echo of what arrived; `?sleep=SECONDS` delays the answer, which
is handy to watch the autoscaler add replicas.
"""
import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the gateway can reuse connections

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path == "/_/health":
            self._send(200, b"OK", "text/plain")
            return
        path, _, query = self.path.partition("?")
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        if "sleep" in params:
            time.sleep(float(params["sleep"]))
        reply = {
            "method": self.command,
            "path": path,
            "query": query,
            "body": body.decode("utf-8", "replace"),
            "pid": os.getpid(),
            "call_id": self.headers.get("X-Call-Id"),
        }
        self._send(200, json.dumps(reply).encode() + b"\n", "application/json")

    def _send(self, status, data, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

    def log_message(self, fmt, *args):
        pass  # one line per request would flood the function's log


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8080"))
    # Loopback for the local provider; compose.yaml sets HOST=0.0.0.0 (its own container).
    host = os.environ.get("HOST", "127.0.0.1")
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    print(f"echo_server listening on {host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
