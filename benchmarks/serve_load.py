"""Requests per second and latency of `swiftdist serve` for short answers, at several client counts.

    python -m benchmarks.serve_load --model smollm2 --adapter output/demo/final --clients 1 8 --requests 32

Starts the server on a free loopback port, warms it up, then for each client count sends a fixed
number of chat requests (greedy, --max-tokens new tokens at most), each client one at a time, and
prints requests/s, p50/p95 latency, completion tokens/s and the server's CPU seconds per request
(which, unlike the wall-clock figures, does not depend on what else the machine runs) as a markdown table. Loopback only,
bounded in requests; the server is stopped with SIGTERM at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.helpers import free_port, test_env

QUESTIONS = ["What is the capital of France?", "What is 2 + 2?", "Name three primary colors.", "Who are you?"]


def start(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "swiftdist.cli", "serve", "--model", args.model, "--port", str(port)]
    for adapter in args.adapter:
        cmd += ["--adapter", adapter]
    proc = subprocess.Popen(cmd, env=test_env(OMP_NUM_THREADS=args.threads), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not come up in 5 minutes")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc): what a request costs, whatever else the machine runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(client, model: str, clients: int, requests: int, max_tokens: int, pid: int) -> dict:
    def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            max_tokens=max_tokens, temperature=0)
        return time.perf_counter() - t0, reply.usage.completion_tokens

    t0, cpu0 = time.perf_counter(), cpu_seconds(pid)
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    latencies = [r[0] for r in results]
    return {"clients": clients, "requests": requests, "req_per_s": requests / wall,
            "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
            "completion_tokens_per_s": sum(r[1] for r in results) / wall,
            "mean_completion_tokens": sum(r[1] for r in results) / requests, "server_cpu_s_per_request": cpu / requests}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--adapter", action="append", default=[], help="[NAME=]DIR, as for swiftdist serve")
    parser.add_argument("--ask", help="the model name requests use (default: the first adapter, else the base)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=32, help="requests per client count")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    args = parser.parse_args()
    import openai

    port = free_port()
    proc = start(args, port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        model = args.ask or client.models.list().data[min(1, len(args.adapter))].id
        measure(client, model, 1, 2, args.max_tokens, proc.pid)  # warm-up: first-call allocations
        rows = [measure(client, model, n, args.requests, args.max_tokens, proc.pid) for n in args.clients]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    print(f"model {args.model}, asking {model!r}, max_tokens {args.max_tokens}, server OMP_NUM_THREADS={args.threads}\n")
    print("| clients | requests | req/s | p50 s | p95 s | completion tok/s | mean completion tokens | server CPU s/request |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['req_per_s']:.2f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | "
              f"{r['completion_tokens_per_s']:.1f} | {r['mean_completion_tokens']:.1f} | "
              f"{r['server_cpu_s_per_request']:.3f} |")
    print(f"\nload average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
