"""The HTTP side of `difflab serve`: the page and a small JSON API, on the standard library's
ThreadingHTTPServer (no dependency, no network calls, nothing loaded from elsewhere).

    GET    /                          the page (one HTML file, inline JS and CSS)
    GET    /api/models                every model: conditioning, labels, samplers, defaults, limits
    POST   /api/jobs                  {"model", "prompt" | "label", "sampler", "steps", "guidance",
                                       "seed", "n"} -> 202 and the job (its id); 400 names a bad field
    GET    /api/jobs/ID               state (queued, running, done, failed, cancelled), step/total, position
    GET    /api/jobs/ID/events        the same as server-sent events, one per change, until it ends
    GET    /api/jobs/ID/image.png     the grid, once done
    DELETE /api/jobs/ID               cancel it (or forget a finished one)

A client keeps its job alive by polling it or holding its event stream open; after
`client_timeout` seconds of neither the job is cancelled (at the next sampler step).
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import urlsplit

from difflab.serve.catalog import Catalog
from difflab.serve.jobs import TERMINAL, JobQueue, QueueFull
from difflab.serve.render import to_png
from difflab.serve.validate import MAX_BODY_BYTES, JobRequest, RequestError, check_job, parse_body

JOB_PATH = re.compile(r"^/api/jobs/([0-9a-f]{16})(/events|/image\.png)?$")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
HEARTBEAT_SECONDS = 0.5  # an event stream writes at least this often, so a closed one is noticed
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DifflabServer(ThreadingHTTPServer):
    """The HTTP server plus what its handlers share: the catalog, the job queue and the page."""

    daemon_threads = True  # an open event stream does not keep the process alive

    def __init__(self, address: tuple[str, int], catalog: Catalog, jobs: JobQueue, verbose: bool = False):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.catalog, self.jobs, self.verbose = catalog, jobs, verbose
        self.page = resources.files("difflab.serve").joinpath("page.html").read_bytes()
        self.loopback = is_loopback(address[0])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def start(self) -> DifflabServer:
        """Serve on a background thread (tests, benchmarks); `close()` stops it."""
        self.jobs.start()
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), name="difflab-serve-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.jobs.close()
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
        self.server_close()


def make_server(
    models=(),
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    device: str | None = "auto",
    dtype: str | None = None,
    client_timeout: float = 10.0,
    max_queued: int = 16,
    keep_finished: int = 32,
    verbose: bool = False,
) -> DifflabServer:
    """A server over `models` (shipped names, run or model folders; a dict name -> those or a
    Pipeline; default: every shipped model), bound but not yet serving: call `.start()` for a
    background thread, or `serve()` for the command line. Models load on their first job."""
    catalog = Catalog.from_sources(models, device=device, dtype=dtype)

    def run(request: JobRequest, progress) -> tuple[bytes, int, int]:
        pipe = catalog.pipeline(request.model)
        return to_png(pipe.generate(request.n, callback=progress, **request.generate_options()))

    jobs = JobQueue(run, max_queued=max_queued, keep_finished=keep_finished, client_timeout=client_timeout)
    return DifflabServer((host, port), catalog, jobs, verbose)


def serve(models=(), host: str = "127.0.0.1", port: int = 8000, **options) -> int:
    """`difflab serve`: serve until Ctrl-C."""
    if not is_loopback(host):
        print(f"difflab serve: warning: binding {host} makes the page reachable from other machines, and it has "
              "no authentication; use --host 127.0.0.1 unless that is what you want", file=sys.stderr)  # fmt: skip
    server = make_server(models, host, port, verbose=True, **options)
    server.jobs.start()
    names = ", ".join(server.catalog.entries)
    print(f"difflab serve: {names} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("difflab serve: stopped", file=sys.stderr)
    finally:
        server.jobs.close()
        server.server_close()
    return 0


class Handler(BaseHTTPRequestHandler):
    server: DifflabServer
    server_version = "difflab"
    protocol_version = "HTTP/1.0"  # one request per connection: simple, and event streams end by closing
    timeout = 30  # seconds a socket may stall, so a client that sends half a request does not hold a thread

    # ---------------------------------------------------------------- routing
    def do_GET(self) -> None:
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            return self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8",
                              {"Content-Security-Policy": PAGE_POLICY})  # fmt: skip
        if path == "/api/models":
            return self._json(HTTPStatus.OK, {"models": self.server.catalog.describe()})
        match = JOB_PATH.match(path)
        if match is None:
            return self._not_found(path)
        job_id, tail = match.groups()
        if tail == "/events":
            return self._events(job_id)
        if tail == "/image.png":
            return self._image(job_id)
        job = self.server.jobs.snapshot(job_id, touch=True)
        return self._json(HTTPStatus.OK, job) if job is not None else self._no_job(job_id)

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        if path != "/api/jobs":
            return self._not_allowed(path, "GET") if path in ("/", "/api/models") or JOB_PATH.match(path) else \
                self._not_found(path)  # fmt: skip
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"send the job as application/json, "
                               f"not {content_type or 'no Content-Type'}")  # fmt: skip
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return self._error(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the body has {int(length)} bytes; at most {MAX_BODY_BYTES} are allowed")  # fmt: skip
        try:
            request = check_job(parse_body(self.rfile.read(int(length))), self.server.catalog)
        except RequestError as e:
            return self._error(HTTPStatus.BAD_REQUEST, str(e), e.field)
        try:
            job = self.server.jobs.submit(request)
        except QueueFull as e:
            return self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(e), headers={"Retry-After": "5"})
        self._json(HTTPStatus.ACCEPTED, job, {"Location": f"/api/jobs/{job['id']}"})

    def do_DELETE(self) -> None:
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        match = JOB_PATH.match(path)
        if match is None or match.group(2) is not None:
            return self._not_allowed(path, "GET") if match or path in ("/", "/api/models") else self._not_found(path)
        job = self.server.jobs.cancel(match.group(1))
        return self._json(HTTPStatus.OK, job) if job is not None else self._no_job(match.group(1))

    def do_PUT(self) -> None:
        self._not_allowed(urlsplit(self.path).path, "GET, POST, DELETE")

    do_PATCH = do_PUT

    # ---------------------------------------------------------------- job resources
    def _image(self, job_id: str) -> None:
        found = self.server.jobs.image(job_id)
        if found is None:
            return self._no_job(job_id)
        state, png = found
        if png is None:
            return self._error(HTTPStatus.CONFLICT, f"job {job_id} is {state}; its image exists once it is done")
        self._send(HTTPStatus.OK, png, "image/png", {"Content-Disposition": f'inline; filename="difflab-{job_id}.png"'})

    def _events(self, job_id: str) -> None:
        """Server-sent events: the job's JSON at every change (and a comment line as heartbeat),
        until it ends. While the stream is open the job's lease is renewed; a write that fails
        means the client went away, and the lease then runs out."""
        jobs = self.server.jobs
        job = jobs.snapshot(job_id, touch=True)
        if job is None:
            return self._no_job(job_id)
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        sent = None
        try:
            self.wfile.write(b"retry: 1000\n\n")
            while job is not None:
                if job["version"] != sent:
                    self.wfile.write(b"data: " + json.dumps(job).encode() + b"\n\n")
                    sent = job["version"]
                else:
                    self.wfile.write(b": heartbeat\n\n")
                self.wfile.flush()
                if job["state"] in TERMINAL or jobs.closed:
                    return
                jobs.wait(job_id, sent, HEARTBEAT_SECONDS)
                job = jobs.snapshot(job_id, touch=True)
        except OSError:  # BrokenPipeError, ConnectionResetError, a timeout: the client is gone
            return

    # ---------------------------------------------------------------- replies
    def _host_ok(self) -> bool:
        """On a loopback address only a loopback Host header is served, so a web page elsewhere
        cannot reach the server through a DNS name it re-points at 127.0.0.1 (DNS rebinding)."""
        if not self.server.loopback:
            return True
        host = self.headers.get("Host", "")
        name = urlsplit(f"//{host}").hostname or ""
        if is_loopback(name):
            return True
        self._error(HTTPStatus.FORBIDDEN, f"Host {host!r} is not this server; use {self.server.url}")
        return False

    def _no_job(self, job_id: str) -> None:
        keep = self.server.jobs.keep_finished
        self._error(HTTPStatus.NOT_FOUND, f"no job {job_id}: unknown, deleted, or older than the last {keep} "
                                          "finished jobs this server keeps")  # fmt: skip

    def _not_found(self, path: str) -> None:
        self._error(HTTPStatus.NOT_FOUND, f"no such path {path!r}; the API is /api/models and /api/jobs")

    def _not_allowed(self, path: str, allow: str) -> None:
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not allowed on {path}; allowed: {allow}",
                    headers={"Allow": allow})  # fmt: skip

    def _error(self, status: HTTPStatus, message: str, field: str | None = None, headers: dict | None = None) -> None:
        self._json(status, {"error": message, "field": field}, headers)

    def _json(self, status: HTTPStatus, body: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(body).encode(), "application/json", headers)

    def _send(self, status: HTTPStatus, data: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        if self.server.verbose:
            sys.stderr.write(f"difflab serve: {self.address_string()} {format % args}\n")
