"""The job queue: one worker thread runs jobs one at a time in the order they came, so two
requests never interleave on a model (nor fight over the CPU); a job whose client went away
(no poll and no open event stream for `client_timeout` seconds) or was DELETEd is cancelled,
at the next sampler step if it is running; finished jobs are kept in a bounded store."""

from __future__ import annotations

import secrets
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from difflab.serve.validate import JobRequest

TERMINAL = ("done", "failed", "cancelled")
Progress = Callable[[int, int], None]
Runner = Callable[[JobRequest, Progress], tuple[bytes, int, int]]  # -> (PNG, width, height)


class JobCancelled(Exception):
    """Raised from the progress callback to stop sampling at the next step."""


class QueueFull(Exception):
    pass


@dataclass(eq=False)
class Job:
    request: JobRequest
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    state: str = "queued"
    step: int = 0
    total: int = 0
    error: str | None = None
    cancel_reason: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    last_seen: float = field(default_factory=time.monotonic)
    png: bytes | None = None
    width: int | None = None
    height: int | None = None
    version: int = 0  # bumped on every change, so an event stream sends only news

    def to_json(self, position: int | None) -> dict:
        seconds = None
        if self.started_at is not None:
            seconds = round((self.finished_at or time.time()) - self.started_at, 3)
        return {
            "id": self.id,
            "model": self.request.model,
            "state": self.state,
            "step": self.step,
            "total": self.total,
            "position": position,
            "error": self.error,
            "request": self.request.to_json(),
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "seconds": seconds,
            "width": self.width,
            "height": self.height,
            "image": f"/api/jobs/{self.id}/image.png" if self.state == "done" else None,
            "version": self.version,
        }


class JobQueue:
    """Jobs in order on one worker thread. Every method is safe to call from any thread."""

    def __init__(self, runner: Runner, *, max_queued: int = 16, keep_finished: int = 32, client_timeout: float = 10.0):
        for name, value in (("max_queued", max_queued), ("keep_finished", keep_finished)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not client_timeout > 0:
            raise ValueError(f"client_timeout must be a positive number of seconds, got {client_timeout!r}")
        self.runner, self.max_queued, self.keep_finished = runner, max_queued, keep_finished
        self.client_timeout = float(client_timeout)
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._finished: OrderedDict[str, Job] = OrderedDict()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="difflab-serve-worker", daemon=True)

    # ---------------------------------------------------------------- life
    def start(self) -> JobQueue:
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker: queued jobs are cancelled, the running one at its next step."""
        with self._cond:
            self._closed = True
            for job in list(self._queue):
                self._finish(job, "cancelled", "the server is shutting down")
            self._queue.clear()
            if self._running is not None:
                self._running.cancel_reason = "the server is shutting down"
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    # ---------------------------------------------------------------- requests
    def submit(self, request: JobRequest) -> dict:
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.max_queued:
                raise QueueFull(f"{len(self._queue)} jobs are waiting, the most this server queues; try again later")
            job = Job(request, total=request.steps)
            self._queue.append(job)
            self._cond.notify_all()
            return job.to_json(self._position(job))

    def snapshot(self, job_id: str, touch: bool = False) -> dict | None:
        """The job's JSON view (None if unknown or no longer kept); `touch` renews its client's lease."""
        with self._cond:
            job = self._find(job_id)
            if job is None:
                return None
            if touch:
                job.last_seen = time.monotonic()
            return job.to_json(self._position(job))

    def image(self, job_id: str) -> tuple[str, bytes | None] | None:
        """(state, PNG or None) of a job, None if unknown."""
        with self._cond:
            job = self._find(job_id)
            return None if job is None else (job.state, job.png)

    def cancel(self, job_id: str, reason: str = "cancelled by the client") -> dict | None:
        """Cancel a queued job now, a running one at its next step; forget a finished one."""
        with self._cond:
            job = self._find(job_id)
            if job is None:
                return None
            if job.state == "queued":
                self._queue.remove(job)
                self._finish(job, "cancelled", reason)
            elif job.state == "running":
                job.cancel_reason = reason
            else:
                del self._finished[job.id]
            return job.to_json(self._position(job))

    def wait(self, job_id: str, version: int, timeout: float) -> None:
        """Block until the job changes (its version differs from `version`), or `timeout`."""

        def changed():
            job = self._find(job_id)
            return self._closed or job is None or job.version != version

        with self._cond:
            self._cond.wait_for(changed, timeout)

    def stats(self) -> dict:
        with self._cond:
            return {
                "queued": len(self._queue),
                "running": self._running is not None,
                "finished_kept": len(self._finished),
                "image_bytes_kept": sum(len(j.png or b"") for j in self._finished.values()),
            }

    # ---------------------------------------------------------------- inside (hold the lock)
    def _find(self, job_id: str) -> Job | None:
        if self._running is not None and self._running.id == job_id:
            return self._running
        for job in self._queue:
            if job.id == job_id:
                return job
        return self._finished.get(job_id)

    def _position(self, job: Job) -> int | None:
        """Jobs that run before this one (the running job counts): 0 when running, None when finished."""
        if job.state == "running":
            return 0
        if job.state != "queued":
            return None
        return self._queue.index(job) + (self._running is not None)

    def _changed(self, job: Job) -> None:
        job.version += 1
        self._cond.notify_all()

    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        job.state, job.error, job.finished_at = state, error, time.time()
        self._finished[job.id] = job
        while len(self._finished) > self.keep_finished:  # bounded: the oldest results go first
            self._finished.popitem(last=False)
        self._changed(job)

    def _reap(self) -> None:
        """Cancel the jobs whose client has gone away."""
        now = time.monotonic()
        reason = f"the client went away (no poll or event stream for {self.client_timeout:g} s)"
        for job in [j for j in self._queue if now - j.last_seen > self.client_timeout]:
            self._queue.remove(job)
            self._finish(job, "cancelled", reason)
        running = self._running
        if running is not None and running.cancel_reason is None and now - running.last_seen > self.client_timeout:
            running.cancel_reason = reason

    # ---------------------------------------------------------------- the worker
    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    self._reap()
                    if self._queue:
                        break
                    self._cond.wait(0.5)
                job = self._running = self._queue.popleft()
                job.state, job.started_at = "running", time.time()
                self._changed(job)
            self._run(job)

    def _run(self, job: Job) -> None:
        def progress(done: int, total: int) -> None:
            with self._cond:
                job.step, job.total = done, total
                self._changed(job)
                self._reap()
                reason = job.cancel_reason
            if reason is not None:
                raise JobCancelled(reason)

        outcome, error, png = "done", None, None
        try:
            if job.cancel_reason is not None:
                raise JobCancelled(job.cancel_reason)
            png = self.runner(job.request, progress)
        except JobCancelled as e:
            outcome, error = "cancelled", str(e)
        except ValueError as e:  # a request the checks let through but the model refused
            outcome, error = "failed", str(e)
        except Exception as e:  # noqa: BLE001 - the worker must survive any job
            traceback.print_exc()
            outcome, error = "failed", f"internal error: {type(e).__name__}: {e}"
        with self._cond:
            if png is not None:
                job.png, job.width, job.height = png
            self._running = None
            self._finish(job, outcome, error)
