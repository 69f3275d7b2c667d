"""A fault-injecting HTTP proxy on loopback in front of an S3 endpoint (moto's server): S3's transient failures on
demand, for the storage fault tests.

Each request is matched against `plan`: a list of (method, path fragment, fault) consumed in order, first match
first; a fault is "503" (S3's `SlowDown`), "reset" (the connection closes before any response) or "truncate"
(the response declares its full length and sends half of the body). Requests that match nothing are forwarded
unchanged. `log` keeps (method, path, status or fault) of every request.
"""
from __future__ import annotations

import http.client
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b'<Message>Please reduce your request rate.</Message></Error>')


class FaultProxy:
    def __init__(self, upstream: str):
        self.upstream = urlparse(upstream)
        self.plan: list[tuple[str, str, str]] = []
        self.log: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _fault(self) -> str | None:
                with proxy.lock:
                    for i, (method, frag, fault) in enumerate(proxy.plan):
                        if method == self.command and frag in self.path:
                            del proxy.plan[i]
                            return fault
                return None

            def _body(self) -> bytes:
                """The request body as sent: Content-Length bytes, or the raw chunked stream (aws-chunked uploads)
                with its framing and trailers, forwarded as it is."""
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                raw = b""
                while True:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0].strip(), 16)
                    if size == 0:
                        break
                    raw += self.rfile.read(size + 2)
                while True:  # trailers, then the empty line
                    line = self.rfile.readline()
                    raw += line
                    if line in (b"\r\n", b"\n", b""):
                        return raw

            def _handle(self):
                body = self._body()
                fault = self._fault()
                if fault == "reset":
                    proxy.log.append((self.command, self.path, "reset"))
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault == "503":
                    proxy.log.append((self.command, self.path, "503"))
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                proxy.log.append((self.command, self.path, "truncate" if fault == "truncate" else str(resp.status)))
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(k, v)
                # HEAD: the object's length as upstream declared it (there is no body to count)
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if fault == "truncate" and self.command != "HEAD":
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        socketserver.TCPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def faults(self) -> list[tuple[str, str, str]]:
        return [e for e in self.log if e[2] in ("503", "reset", "truncate")]
