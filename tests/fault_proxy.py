"""A fault-injecting HTTP proxy for storage tests (this module holds no tests).

``FaultProxy(upstream)`` listens on a free localhost port and forwards every request to
``upstream`` (e.g. a fake-gcs-server URL). Point a client at ``proxy.url`` instead of the
server, then:

* ``proxy.fail(pattern, seconds)``: requests whose target matches ``pattern`` (a regular
  expression, searched) get ``503 Service Unavailable`` for ``seconds`` counted from the
  first such request (``None``: until ``heal``). The target is the request line's path and query, URL-decoded, followed by
  the first 4 KiB of the request body: object names are found in download and metadata paths
  (``/o/run/checkpoints/30/...``), listing prefixes (``?prefix=run/checkpoints/``) and the
  JSON part of multipart uploads (``"name": "run/commit_success.txt"``) alike.
* ``proxy.delay(seconds, pattern=".")``: matching requests wait ``seconds`` before being
  forwarded (a slow bucket).
* ``proxy.failed``: how many requests were answered 503 so far.

Runs in a thread of the test process; ``close()`` (or leaving a ``with`` block) stops it.
"""

from __future__ import annotations

import http.client
import http.server
import re
import socketserver
import threading
import time
import urllib.parse

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding",
                         "te", "trailer", "upgrade", "content-length"})


class FaultProxy:
  """An HTTP/1.1 proxy to ``upstream`` (``http://host:port``) with chosen faults."""

  def __init__(self, upstream: str):
    parsed = urllib.parse.urlsplit(upstream)
    self._upstream = (parsed.hostname, parsed.port)
    self._lock = threading.Lock()
    self._failures: list[list] = []  # [pattern, seconds, end time once it began]
    self._delays: list[tuple[re.Pattern, float]] = []
    self.failed = 0
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # quiet
        pass

      def _forward(self):
        body = self._read_body()
        target = urllib.parse.unquote(self.path) + body[:4096].decode("latin-1")
        pause = proxy._delay_for(target)
        if pause:
          time.sleep(pause)
        if proxy._should_fail(target):
          message = b'{"error": {"code": 503, "message": "injected outage"}}'
          self.send_response(503)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(message)))
          self.end_headers()
          self.wfile.write(message)
          return
        headers = {key: value for key, value in self.headers.items()
                   if key.lower() not in _HOP_BY_HOP}
        connection = http.client.HTTPConnection(*proxy._upstream, timeout=120)
        try:
          connection.request(self.command, self.path, body=body, headers=headers)
          response = connection.getresponse()
          payload = response.read()
          self.send_response(response.status, response.reason)
          for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP:
              self.send_header(key, value)
          self.send_header("Content-Length", str(len(payload)))
          self.end_headers()
          if self.command != "HEAD":
            self.wfile.write(payload)
        finally:
          connection.close()

      def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
          chunks = []
          while True:
            size = int(self.rfile.readline().split(b";")[0], 16)
            if size == 0:
              while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
              return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
      daemon_threads = True
      allow_reuse_address = True

    self._server = Server(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
    self._thread.start()

  def fail(self, pattern: str, seconds: float | None) -> None:
    """Answers 503 to requests matching ``pattern`` for ``seconds`` from the first one
    (None: until ``heal``)."""
    with self._lock:
      self._failures.append([re.compile(pattern), seconds, None])

  def delay(self, seconds: float, pattern: str = ".") -> None:
    """Holds every request matching ``pattern`` for ``seconds`` before forwarding it."""
    with self._lock:
      self._delays.append((re.compile(pattern), seconds))

  def heal(self) -> None:
    """Ends every failure and delay."""
    with self._lock:
      self._failures, self._delays = [], []

  def _should_fail(self, target: str) -> bool:
    now = time.monotonic()
    hit = False
    with self._lock:
      for failure in self._failures:
        pattern, seconds, until = failure
        if not pattern.search(target):
          continue
        if until is None:  # the outage begins
          until = failure[2] = float("inf") if seconds is None else now + seconds
        hit = hit or until > now
      self.failed += hit
    return hit

  def _delay_for(self, target: str) -> float:
    with self._lock:
      return sum(seconds for pattern, seconds in self._delays if pattern.search(target))

  def close(self) -> None:
    self._server.shutdown()
    self._server.server_close()
    self._thread.join(timeout=10)

  def __enter__(self) -> "FaultProxy":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
