"""Serve benchmark: a bounded loopback load test of `difflab serve`.

The server runs as its own process (`difflab serve digits-ddpm --port 0`), so its memory is
measured alone. After a warm-up (the model loads on the first job), 8 client threads send 100
jobs in all, each a small grid from the shipped digits DDPM (n=4, DDIM-2), follow the job's
event stream until it ends, then download and decode the PNG. Reported: throughput, end-to-end
latency (submit -> PNG received; with one worker it includes the wait behind the other
clients' jobs) and the server-side sampling time, errors (goal 0) and the server's resident
memory before and after the load (goal: growth within RSS_TOLERANCE_MIB, i.e. finished jobs
are dropped from the bounded store and nothing else accumulates).

    OMP_NUM_THREADS=1 python benchmarks/serve.py [--requests 100] [--clients 8] [--steps 2] [--n 4]

Writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "digits-ddpm"
RSS_TOLERANCE_MIB = 16.0
WARMUP = 10


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def one_job(port: int, body: dict) -> dict:
    """Submit, follow the event stream to the end, fetch the PNG; what happened and how long it took."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/api/jobs", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    job = json.loads(reply.read())
    conn.close()
    if reply.status != 202:
        return {"error": f"POST {reply.status}: {job.get('error')}"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", f"/api/jobs/{job['id']}/events")
    stream = conn.getresponse()
    last = job
    for line in stream.fp:
        if line.startswith(b"data: "):
            last = json.loads(line[6:])
    conn.close()
    if last["state"] != "done":
        return {"error": f"job ended {last['state']}: {last.get('error')}"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", last["image"])
    reply = conn.getresponse()
    png = reply.read()
    conn.close()
    if reply.status != 200:
        return {"error": f"image {reply.status}"}
    size = Image.open(io.BytesIO(png)).size
    if size != (last["width"], last["height"]):
        return {"error": f"PNG is {size}, the job says {(last['width'], last['height'])}"}
    return {"latency": time.perf_counter() - started, "sampling": last["seconds"]}


def load(port: int, requests: int, clients: int, body: dict) -> tuple[list[dict], float]:
    """`requests` jobs from `clients` threads at once; (outcomes, wall seconds)."""
    outcomes, lock, counter = [], threading.Lock(), iter(range(requests))

    def client():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                outcome = one_job(port, {**body, "seed": i})
            except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the run
                outcome = {"error": f"{type(e).__name__}: {e}"}
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--out", default=str(RESULTS / "serve.json"))
    args = p.parse_args()

    command = [sys.executable, "-m", "difflab.cli", "serve", MODEL, "--port", "0", "--device", "cpu"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        if "http://" not in line:
            raise RuntimeError(f"the server did not start: {line!r}")
        port = int(line.split("http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        body = {"model": MODEL, "n": args.n, "steps": args.steps, "sampler": "ddim"}
        warm, _ = load(port, WARMUP, 2, body)  # loads the model, fills the allocator's pools
        before = rss_mib(server.pid)
        outcomes, seconds = load(port, args.requests, args.clients, body)
        after = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(10)

    errors = [o["error"] for o in outcomes + warm if "error" in o]
    latency = [o["latency"] for o in outcomes if "latency" in o]
    sampling = [o["sampling"] for o in outcomes if "sampling" in o]
    result = {
        "model": MODEL,
        "job": body,
        "clients": args.clients,
        "requests": args.requests,
        "warmup_requests": WARMUP,
        "seconds": round(seconds, 2),
        "throughput_jobs_per_s": round(len(latency) / seconds, 2),
        "latency_s": {
            "p50": round(percentile(latency, 0.5), 3),
            "p95": round(percentile(latency, 0.95), 3),
            "max": round(max(latency), 3),
        }
        if latency
        else None,
        "sampling_s_median": round(statistics.median(sampling), 3) if sampling else None,
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "rss_mib": {
            "before": round(before, 1),
            "after": round(after, 1),
            "growth": round(after - before, 1),
            "tolerance": RSS_TOLERANCE_MIB,
        },
        "rss_within_tolerance": after - before <= RSS_TOLERANCE_MIB,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0 if not errors and result["rss_within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
