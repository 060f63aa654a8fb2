"""`difflab serve` over plain HTTP on a loopback port: the model list, a job from request to PNG,
every refused request (400 naming the field; each limit also accepted one step inside it), 404s,
the queue (one job at a time, in order), cancellation when the client goes away, and the bounded
store of finished jobs. The models are tiny random U-Nets saved to a temporary folder, plus one
slowed down in memory so that queueing and cancelling can be watched."""

from __future__ import annotations

import http.client
import io
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from difflab.cli import build_parser
from difflab.denoiser import DenoiserWrapper, NetworkDenoiser
from difflab.nets import UNet
from difflab.nets.text import TextConditionalUNet
from difflab.pipelines import Pipeline, new_manifest
from difflab.schedules import Schedule
from difflab.serve import make_server

T = 100  # the tiny models' schedule length: steps above it are refused
WORDS = 6  # the tiny text model's encoder reads at most this many words
SHAPE = (1, 8, 8)


# ---------------------------------------------------------------- tiny models
def _unet(**options) -> UNet:
    torch.manual_seed(0)
    return UNet(in_channels=options.pop("in_channels", 1), model_channels=8, channel_mult=[1], num_res_blocks=1,
                attention_resolutions=[], norm_groups=4, **options).eval()  # fmt: skip


def _pipeline(net, shape=SHAPE, steps=T, **manifest) -> Pipeline:
    schedule = Schedule.make("cosine", T=steps)
    m = new_manifest(schedule=schedule.to_config(), prediction="eps", variance="fixed_small", sample_shape=list(shape),
                     thresholding="static", **manifest)  # fmt: skip
    return Pipeline(NetworkDenoiser(net, schedule, "eps", sample_shape=shape), m)


class Slow(DenoiserWrapper):
    """Sleeps at every network call and logs the batch size, so a test can see who runs when."""

    def __init__(self, inner, seconds: float):
        super().__init__(inner)
        self.seconds, self.log = seconds, []

    def predict(self, x_t, t, cond):
        self.log.append(x_t.shape[0])
        time.sleep(self.seconds)
        return self.inner.predict(x_t, t, cond)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-models")
    text_net = TextConditionalUNet({
        "unet": dict(in_channels=3, model_channels=8, channel_mult=[1], num_res_blocks=1, norm_groups=4,
                     attention_resolutions=[]),
        "text_encoder": dict(dim=8, depth=0, num_heads=2, max_length=WORDS),
    }).eval()  # fmt: skip
    pipes = {
        "tiny": _pipeline(_unet()),
        "tiny-class": _pipeline(_unet(num_classes=3), conditioning="class", num_classes=3),
        "tiny-text": _pipeline(text_net, (3, 8, 8), conditioning="text", null_caption=""),
    }
    return {name: pipe.save_pretrained(root / name) for name, pipe in pipes.items()}


@pytest.fixture
def start(folders):
    """start(**options) -> a running server over the tiny folders and a slow in-memory model."""
    servers = []

    def make(step_seconds: float = 0.03, **options):
        slow = _pipeline(_unet(), steps=1000)
        slow.denoiser = Slow(slow.denoiser, step_seconds)
        models = {**folders, "slow": slow}
        server = make_server(models, "127.0.0.1", 0, device="cpu", **options).start()
        server.slow = slow.denoiser
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


# ---------------------------------------------------------------- HTTP
def call(server, method: str, path: str, body=None, *, raw: bytes | None = None, headers: dict | None = None):
    """(status, JSON or bytes) of one request."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    if body is not None:
        raw = json.dumps(body).encode()
    sent = {"Content-Type": "application/json"} if raw is not None else {}
    conn.request(method, path, body=raw, headers={**sent, **(headers or {})})
    reply = conn.getresponse()
    data = reply.read()
    conn.close()
    if reply.getheader("Content-Type") == "application/json":
        return reply.status, json.loads(data)
    return reply.status, data


def submit(server, **body) -> dict:
    status, job = call(server, "POST", "/api/jobs", body)
    assert status == 202, job
    return job


def wait(server, job_id: str, states=("done", "failed", "cancelled"), timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, job = call(server, "GET", f"/api/jobs/{job_id}")
        assert status == 200, job
        if job["state"] in states:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not reach {states} in {timeout} s: {job}")


def expected_size(n: int, height: int = 8, width: int = 8) -> tuple[int, int]:
    """The grid PNG's (width, height), worked out here and not with the server's code: a
    square-ish grid of ceil(sqrt(n)) columns with 2 white pixels between and around the images."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    return cols * (width + 2) + 2, rows * (height + 2) + 2


# ---------------------------------------------------------------- the model list and a job
def test_the_models_are_listed_with_what_the_form_needs(start):
    server = start()
    status, body = call(server, "GET", "/api/models")
    assert status == 200
    models = {m["name"]: m for m in body["models"]}
    assert set(models) == {"tiny", "tiny-class", "tiny-text", "slow"}
    assert models["tiny"]["conditioning"] is None and models["tiny"]["limits"]["guidance"] is None
    assert models["tiny-class"]["labels"] == [0, 1, 2]
    assert models["tiny-text"]["limits"]["prompt_words"] == WORDS
    assert models["tiny"]["limits"]["steps"] == [1, T] and models["tiny"]["limits"]["n"] == [1, 64]
    assert models["tiny"]["defaults"]["sampler"] == "ddim" and "dpmpp_2m_karras" in models["tiny"]["samplers"]
    assert "consistency" not in models["tiny"]["samplers"]
    assert server.catalog.loaded == []  # models load on their first job, not before


@pytest.mark.parametrize(
    "model, options, n",
    [("tiny", {}, 5), ("tiny-class", {"label": 2, "guidance": 1.5}, 4), ("tiny-text", {"prompt": "a red circle"}, 2)],
)
def test_a_job_runs_to_a_png_of_the_requested_grid(start, folders, model, options, n):
    server = start()
    job = submit(server, model=model, n=n, steps=2, seed=7, sampler="ddim", **options)
    assert job["state"] == "queued" and job["total"] == 2
    done = wait(server, job["id"])
    assert done["state"] == "done", done
    assert (done["step"], done["total"]) == (2, 2)
    status, png = call(server, "GET", done["image"])
    assert status == 200
    image = Image.open(io.BytesIO(png))
    channels = 3 if model == "tiny-text" else 1
    assert image.format == "PNG" and image.size == expected_size(n) == (done["width"], done["height"])
    assert image.mode == ("RGB" if channels == 3 else "L")
    # the first cell holds the pipeline's own first sample for that seed
    reference = Pipeline.from_pretrained(folders[model], device="cpu")(n, steps=2, seed=7, **options)[0]
    cell = image.crop((2, 2, 10, 10))
    assert list(cell.get_flattened_data()) == list(reference.get_flattened_data())
    assert model in server.catalog.loaded


def test_the_event_stream_reports_progress_until_the_job_ends(start):
    server = start()
    job = submit(server, model="slow", n=1, steps=6)
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", f"/api/jobs/{job['id']}/events")
    reply = conn.getresponse()
    assert reply.status == 200 and reply.getheader("Content-Type") == "text/event-stream"
    events = [json.loads(line[6:]) for line in reply.read().decode().splitlines() if line.startswith("data: ")]
    conn.close()
    steps = [e["step"] for e in events]
    assert steps == sorted(steps) and events[-1]["state"] == "done" and steps[-1] == 6
    assert any(e["state"] == "running" and 0 < e["step"] < 6 for e in events)  # progress seen along the way


def test_the_page_is_one_self_contained_html_file(start):
    server = start()
    status, page = call(server, "GET", "/")
    assert status == 200
    text = page.decode()
    assert "<script>" in text and "/api/models" in text and "EventSource" in text
    for external in ("http://", "https://", 'src="//', 'href="//', "@import"):
        assert external not in text  # nothing from elsewhere: no script, style, font or image


# ---------------------------------------------------------------- refused requests
BAD = [
    ({"model": "nope"}, "model", "model must be one of"),
    ({}, "model", "model must be one of"),
    ({"model": "tiny", "colour": "red"}, "colour", "unknown key(s) colour; allowed:"),
    ({"model": "tiny", "n": 0}, "n", "n must be an integer in [1, 64], got 0"),
    ({"model": "tiny", "n": 65}, "n", "n must be an integer in [1, 64], got 65"),
    ({"model": "tiny", "n": 2.5}, "n", "n must be an integer"),
    ({"model": "tiny", "n": "4"}, "n", "n must be an integer"),
    ({"model": "tiny", "n": True}, "n", "n must be an integer"),
    ({"model": "tiny", "steps": 0}, "steps", f"steps must be an integer in [1, {T}], got 0"),
    ({"model": "tiny", "steps": T + 1}, "steps", f"steps must be an integer in [1, {T}], got {T + 1}"),
    ({"model": "tiny", "sampler": "magic"}, "sampler", "sampler must be one of ddpm, ddim"),
    ({"model": "tiny", "sampler": "consistency"}, "sampler", "sampler must be one of"),
    ({"model": "tiny", "seed": -1}, "seed", "seed must be an integer in [0, 2**63 - 1], got -1"),
    ({"model": "tiny", "seed": 2**63}, "seed", "seed must be an integer in [0, 2**63 - 1]"),
    ({"model": "tiny", "guidance": 1.0}, "guidance", "'tiny' is unconditional: leave guidance out"),
    ({"model": "tiny-class", "guidance": 20.5}, "guidance", "guidance must be a number in [0, 20], got 20.5"),
    ({"model": "tiny-class", "guidance": -0.5}, "guidance", "guidance must be a number in [0, 20]"),
    ({"model": "tiny-class", "guidance": "2"}, "guidance", "guidance must be a number"),
    ({"model": "tiny-class", "label": 3}, "label", "label must be an integer in [0, 2], got 3"),
    ({"model": "tiny-class", "label": -1}, "label", "label must be an integer in [0, 2]"),
    ({"model": "tiny", "label": 1}, "label", "'tiny' is not class-conditional"),
    ({"model": "tiny-class", "prompt": "a red circle"}, "prompt", "'tiny-class' is not text-conditional"),
    ({"model": "tiny-text"}, "prompt", "'tiny-text' needs a prompt"),
    ({"model": "tiny-text", "prompt": 7}, "prompt", "needs a prompt: a string"),
    ({"model": "tiny-text", "prompt": "  "}, "prompt", f"prompt must have 1 to {WORDS} words, got 0"),
    ({"model": "tiny-text", "prompt": "a b c d e f g"}, "prompt", f"prompt must have 1 to {WORDS} words, got 7"),
    ({"model": "tiny-text", "prompt": "a" * 201}, "prompt", "prompt must have at most 200 characters, got 201"),
    ({"model": "tiny-text", "prompt": "a <b>red</b> circle"}, "prompt", "prompt may hold letters, digits"),
]


@pytest.mark.parametrize("body, field, words", BAD, ids=[f"{b.get('model')}-{f}-{i}" for i, (b, f, _) in
                                                         enumerate(BAD)])  # fmt: skip
def test_bad_requests_are_refused_naming_the_field_and_what_is_allowed(start, body, field, words):
    server = start()
    status, reply = call(server, "POST", "/api/jobs", body)
    assert status == 400, reply
    assert reply["field"] == field
    assert words in reply["error"]


GOOD = [  # each limit above, one step inside it: accepted (then cancelled)
    {"model": "tiny", "n": 64, "steps": T, "seed": 2**63 - 1, "sampler": "dpmpp_2m_karras"},
    {"model": "tiny", "n": 1, "steps": 1, "seed": 0},
    {"model": "tiny-class", "guidance": 20, "label": 2},
    {"model": "tiny-class", "guidance": 0, "label": 0},
    {"model": "tiny-text", "prompt": "a b c d e f"},
    {"model": "tiny-text", "prompt": "a" * 200},
    {"model": "tiny-text", "prompt": "big, red; circle! isn't-it?"},
]


def test_requests_at_every_limit_are_accepted(start):
    server = start(max_queued=len(GOOD))
    for body in GOOD:
        status, job = call(server, "POST", "/api/jobs", body)
        assert status == 202, (body, job)
        assert call(server, "DELETE", f"/api/jobs/{job['id']}")[0] == 200  # only the checks are tested here


@pytest.mark.parametrize(
    "raw, headers, status, words",
    [
        (b"{not json", {}, 400, "the body is not valid JSON"),
        (b"[1, 2]", {}, 400, "the body must be a JSON object"),
        (b'{"model": "tiny-class", "guidance": NaN}', {}, 400, "guidance must be a number in [0, 20], got nan"),
        (b"\xff\xfe", {}, 400, "the body is not valid JSON"),
        (b'{"model": "tiny"}', {"Content-Type": "text/plain"}, 415, "send the job as application/json"),
        (b'{"model": "tiny", "seed": 1' + b" " * 4096 + b"}", {}, 413, "at most 4096 are allowed"),
    ],
)
def test_bodies_that_are_not_a_small_json_object_are_refused(start, raw, headers, status, words):
    server = start()
    got, reply = call(server, "POST", "/api/jobs", raw=raw, headers=headers)
    assert got == status and words in reply["error"], reply


def test_unknown_paths_and_jobs_are_404_and_wrong_methods_405(start):
    server = start()
    missing = "0123456789abcdef"
    for method, path in [("GET", "/nope"), ("GET", "/api"), ("GET", "/api/jobs/NOT-AN-ID"), ("POST", "/api/nope"),
                         ("GET", f"/api/jobs/{missing}"), ("GET", f"/api/jobs/{missing}/events"),
                         ("GET", f"/api/jobs/{missing}/image.png"), ("DELETE", f"/api/jobs/{missing}")]:  # fmt: skip
        status, reply = call(server, method, path)
        assert status == 404 and reply["error"], (method, path, reply)
    assert call(server, "POST", "/api/models", {})[0] == 405
    assert call(server, "PUT", "/api/jobs", {})[0] == 405
    status, reply = call(server, "GET", "/api/models", headers={"Host": "attacker.example:80"})
    assert status == 403 and "is not this server" in reply["error"]  # DNS rebinding guard
    assert call(server, "GET", "/api/models", headers={"Host": "localhost:1"})[0] == 200


def test_an_image_is_409_until_its_job_is_done(start):
    server = start()
    job = submit(server, model="slow", n=1, steps=20)
    status, reply = call(server, "GET", f"/api/jobs/{job['id']}/image.png")
    assert status == 409 and "its image exists once it is done" in reply["error"]
    call(server, "DELETE", f"/api/jobs/{job['id']}")


# ---------------------------------------------------------------- the queue
def test_jobs_run_one_at_a_time_in_the_order_they_came(start):
    server = start(step_seconds=0.03)
    first = submit(server, model="slow", n=1, steps=20)
    second = submit(server, model="slow", n=2, steps=20)
    assert second["position"] == 1  # one job ahead of it
    seen = call(server, "GET", f"/api/jobs/{second['id']}")[1]
    assert seen["state"] == "queued" and seen["position"] == 1
    one, two = wait(server, first["id"]), wait(server, second["id"])
    assert one["state"] == two["state"] == "done"
    assert one["finished_at"] <= two["started_at"]
    assert server.slow.log == [1] * 20 + [2] * 20  # every call of the first job, then every call of the second


def test_a_full_queue_answers_503(start):
    server = start(step_seconds=0.05, max_queued=1)
    running = submit(server, model="slow", n=1, steps=100)
    wait(server, running["id"], states=("running",))
    queued = submit(server, model="slow", n=1, steps=2)
    status, reply = call(server, "POST", "/api/jobs", {"model": "slow", "n": 1, "steps": 2})
    assert status == 503 and "jobs are waiting" in reply["error"]
    call(server, "DELETE", f"/api/jobs/{queued['id']}")
    assert call(server, "GET", f"/api/jobs/{queued['id']}")[1]["state"] == "cancelled"
    call(server, "DELETE", f"/api/jobs/{running['id']}")
    assert wait(server, running["id"])["state"] == "cancelled"
    assert submit(server, model="slow", n=1, steps=2)["position"] == 0  # room again


def test_delete_cancels_a_running_job_at_its_next_step(start):
    server = start(step_seconds=0.05)
    job = submit(server, model="slow", n=1, steps=200)
    wait(server, job["id"], states=("running",))
    status, reply = call(server, "DELETE", f"/api/jobs/{job['id']}")
    assert status == 200
    done = wait(server, job["id"])
    assert done["state"] == "cancelled" and done["step"] < 200 and "cancelled by the client" in done["error"]
    assert len(server.slow.log) == done["step"]  # nothing ran after the step that saw the request
    follow = submit(server, model="tiny", n=1, steps=1)  # the worker lives on
    assert wait(server, follow["id"])["state"] == "done"


def test_a_job_whose_client_stops_polling_is_cancelled(start):
    server = start(step_seconds=0.05, client_timeout=0.5)
    job = submit(server, model="slow", n=1, steps=200)  # 10 s if it ran to the end
    wait(server, job["id"], states=("running",))
    stopped = time.monotonic()  # no poll from here on
    job = settled(server, job["id"])
    assert job["state"] == "cancelled" and job["step"] < 200, job
    assert "the client went away" in job["error"]
    assert time.monotonic() - stopped < 5  # the lease (0.5 s) and a step, not the 10 s the job needed


def settled(server, job_id: str, timeout: float = 30.0) -> dict:
    """The job once it is neither queued nor running, looked at without renewing its lease."""
    deadline = time.monotonic() + timeout
    while (job := server.jobs.snapshot(job_id))["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def _stream(server, job_id: str, events: int | None):
    """Read `events` data lines of a job's event stream, then close it (None: read to the end)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", f"/api/jobs/{job_id}/events")
    reply, seen = conn.getresponse(), []
    while events is None or len(seen) < events:
        line = reply.fp.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            seen.append(json.loads(line[6:]))
    conn.close()
    return seen


def test_a_job_whose_event_stream_closes_is_cancelled_and_an_open_one_keeps_it_alive(start):
    server = start(step_seconds=0.02, client_timeout=1.0)
    # control: nobody polls, but the stream stays open for the whole job (2.4 s > the 1 s lease)
    kept = submit(server, model="slow", n=1, steps=120)
    events = _stream(server, kept["id"], None)
    assert events[-1]["state"] == "done" and events[-1]["step"] == 120
    # the client reads two events and hangs up
    gone = submit(server, model="slow", n=1, steps=1000)
    _stream(server, gone["id"], 2)
    job = settled(server, gone["id"])
    assert job["state"] == "cancelled" and job["step"] < 1000 and "the client went away" in job["error"]


def test_queued_jobs_of_a_client_that_left_are_dropped(start):
    server = start(step_seconds=0.02, client_timeout=0.5)
    running = submit(server, model="slow", n=1, steps=150)
    queued = submit(server, model="slow", n=1, steps=2)
    stop = threading.Event()

    def keep_polling():  # only the running job's client stays
        while not stop.is_set():
            call(server, "GET", f"/api/jobs/{running['id']}")
            time.sleep(0.1)

    poller = threading.Thread(target=keep_polling)
    poller.start()
    try:
        job = settled(server, queued["id"])
        assert job["state"] == "cancelled" and "the client went away" in job["error"]
        assert server.jobs.snapshot(running["id"])["state"] == "running"
    finally:
        stop.set()
        poller.join()


# ---------------------------------------------------------------- bounded memory
def test_finished_jobs_are_kept_in_a_bounded_store(start):
    server = start(keep_finished=2)
    ids = [wait(server, submit(server, model="tiny", n=2, steps=1, seed=s)["id"])["id"] for s in range(5)]
    stats = server.jobs.stats()
    assert stats["finished_kept"] == 2 and stats["queued"] == 0 and not stats["running"]
    for old in ids[:3]:
        status, reply = call(server, "GET", f"/api/jobs/{old}/image.png")
        assert status == 404 and "the last 2 finished jobs" in reply["error"]
    for kept in ids[3:]:
        assert call(server, "GET", f"/api/jobs/{kept}/image.png")[0] == 200
    assert call(server, "DELETE", f"/api/jobs/{ids[4]}")[0] == 200  # a finished job can be dropped at once
    assert server.jobs.stats()["finished_kept"] == 1


# ---------------------------------------------------------------- the command
def test_the_command_serves_the_page_and_warns_off_loopback(folders):
    command = [sys.executable, "-m", "difflab.cli", "serve", str(folders["tiny"]), "--host", "0.0.0.0",
               "--port", "0", "--device", "cpu"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert "tiny at http://0.0.0.0:" in line, (line, process.stderr.read() if process.poll() else "")
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/")
        reply = conn.getresponse()
        assert reply.status == 200 and b"<title>difflab</title>" in reply.read()
        conn.close()
    finally:
        process.terminate()
        process.wait(10)
    assert "warning: binding 0.0.0.0 makes the page reachable from other machines" in process.stderr.read()


def test_the_command_refuses_a_port_out_of_range(capsys):
    assert build_parser().parse_args(["serve", "--port", "65535"]).port == 65535
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--port", "65536"])
    assert "--port: must be an integer in [0, 65535], got '65536'" in capsys.readouterr().err
