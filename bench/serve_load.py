"""Load test of `behemoth serve` on loopback: many concurrent clients, mixed streaming and not.

    .venv/bin/python bench/serve_load.py [--model DIR] [--clients 64] [--requests 2000] [--repeats 3]
                                         [--quick] [--no-write]

Starts `behemoth serve` in a subprocess on 127.0.0.1 (a free port, a fresh keys file with one
unlimited key), then runs `--clients` concurrent clients that together send exactly `--requests`
requests: completions and chat completions, streaming and not, in a seeded mix. Each response is
checked whole (status, JSON shape, one id per response, a finish reason, usage; for streams every
chunk and the closing [DONE]). Reports errors, lost responses (sent but never complete) and
duplicated ones (an id seen twice), p50/p99 latency and time to first token, aggregate completion
tokens/s, and the server's resident memory before, at peak and after. Bounded in count
(`--requests`) and time (`--time-limit`: no new request starts after it; each request also has
its own timeout); it only ever connects to 127.0.0.1.

Without --model it serves the tiny preset with random weights and a tokenizer trained on the spot:
that measures the server and engine machinery, not a model's speed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import Figure, bench_arguments, finish, summary  # noqa: E402

HOST = "127.0.0.1"  # loopback only, by construction
PROMPTS = ["In the beginning", "Tell me a story about a fox.", "What is two plus two?",
           "Write a short poem about the sea.", "Explain batching in one sentence.", "Hello!"]


@dataclasses.dataclass
class Result:
    index: int
    kind: str
    ok: bool
    latency: float
    first_token: float | None = None
    completion_tokens: int = 0
    response_id: str | None = None
    error: str | None = None


def tiny_model_dir(path: Path) -> Path:
    import behemoth
    from behemoth.config import preset
    from behemoth.model import Transformer, init_weights
    from behemoth.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([p + " The quick brown fox jumps over the lazy dog." for p in PROMPTS] * 40, 400)
    config = dataclasses.replace(preset("tiny"), vocab_size=tokenizer.vocab_size)
    model = Transformer(config)
    init_weights(model, seed=0)
    behemoth.save(model, path, tokenizer=tokenizer)
    return path


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, work: Path, max_batch_size: int, *extra: str) -> tuple[subprocess.Popen, str, str]:
    from behemoth.serve.keys import Limits, create_key

    key, _ = create_key(work / "keys.json", "load-test", Limits(requests_per_minute=None, tokens_per_minute=None))
    port = free_port()
    log = (work / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "behemoth", "serve", "--model", f"bench={model_dir}", "--host", HOST,
         "--port", str(port), "--api-keys", str(work / "keys.json"), "--max-batch-size", str(max_batch_size),
         "--max-queue", "1024", *extra], stdout=log, stderr=log)
    url = f"http://{HOST}:{port}"
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{(work / 'server.log').read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url, key
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("server did not start within 180 s")


def request_body(index: int, rng: random.Random, max_tokens: int, stream_fraction: float) -> tuple[str, str, dict]:
    stream = rng.random() < stream_fraction
    chat = rng.random() < 0.5
    body: dict = {"model": "bench", "max_tokens": rng.randint(max(1, max_tokens // 2), max_tokens),
                  "temperature": rng.choice([0.0, 0.7, 1.0]), "seed": index, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    prompt = rng.choice(PROMPTS) + f" (request {index})"
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    kind = ("chat" if chat else "completion") + ("-stream" if stream else "")
    return ("/v1/chat/completions" if chat else "/v1/completions"), kind, body


async def one_request(client, url: str, key: str, index: int, path: str, kind: str, body: dict,
                      timeout: float) -> Result:
    headers = {"Authorization": f"Bearer {key}"}
    start = time.perf_counter()
    try:
        if not body["stream"]:
            response = await client.post(url + path, json=body, headers=headers, timeout=timeout)
            latency = time.perf_counter() - start
            if response.status_code != 200:
                return Result(index, kind, False, latency, error=f"HTTP {response.status_code}: {response.text[:200]}")
            data = response.json()
            choice = data["choices"][0]
            if not data.get("id") or choice.get("finish_reason") not in ("stop", "length"):
                return Result(index, kind, False, latency, error="incomplete response")
            return Result(index, kind, True, latency, None, data["usage"]["completion_tokens"], data["id"])
        first = None
        ids, finishes, usage, done = set(), 0, None, False
        async with client.stream("POST", url + path, json=body, headers=headers, timeout=timeout) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return Result(index, kind, False, time.perf_counter() - start,
                              error=f"HTTP {response.status_code}: {text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(payload)
                if "error" in chunk:
                    return Result(index, kind, False, time.perf_counter() - start, error=str(chunk["error"]))
                ids.add(chunk["id"])
                for choice in chunk["choices"]:
                    delta = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                    if delta and first is None:
                        first = time.perf_counter() - start
                    finishes += choice.get("finish_reason") is not None
                usage = chunk.get("usage") or usage
        latency = time.perf_counter() - start
        if not done or len(ids) != 1 or finishes != 1 or usage is None:
            return Result(index, kind, False, latency, error=f"incomplete stream (done={done}, ids={len(ids)}, "
                                                             f"finishes={finishes}, usage={usage is not None})")
        return Result(index, kind, True, latency, first, usage["completion_tokens"], ids.pop())
    except Exception as err:  # a timeout or a broken connection: counted, never fatal
        return Result(index, kind, False, time.perf_counter() - start, error=f"{type(err).__name__}: {err}")


async def run_load(url: str, key: str, args: argparse.Namespace, server_pid: int) -> tuple[list[Result], float, float]:
    import httpx

    rng = random.Random(args.seed)
    plan = [request_body(i, rng, args.max_tokens, args.stream_fraction) for i in range(args.requests)]
    next_index = 0
    results: list[Result] = []
    peak = rss_mib(server_pid)
    deadline = time.monotonic() + args.time_limit
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)

    async def client_loop(client) -> None:
        nonlocal next_index
        while next_index < len(plan) and time.monotonic() < deadline:
            index = next_index
            next_index += 1
            path, kind, body = plan[index]
            results.append(await one_request(client, url, key, index, path, kind, body, args.request_timeout))

    async def watch_memory() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mib(server_pid))
            await asyncio.sleep(0.5)

    async with httpx.AsyncClient(limits=limits) as client:
        watcher = asyncio.create_task(watch_memory())
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(args.clients)))
        elapsed = time.perf_counter() - started
        watcher.cancel()
    return results, elapsed, peak


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run_stats(results: list[Result], elapsed: float, requests: int) -> dict:
    """The figures of one load run."""
    ok = [r for r in results if r.ok]
    ids = [r.response_id for r in ok]
    tokens = sum(r.completion_tokens for r in ok)
    latencies = [r.latency for r in ok]
    first = [r.first_token for r in ok if r.first_token is not None]
    return {"sent": len(results), "completed": len(ok), "errors": len(results) - len(ok),
            "lost": requests - len(ok), "not_sent": requests - len(results), "duplicated": len(ids) - len(set(ids)),
            "wall": elapsed, "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "ttft50": percentile(first, 50), "ttft99": percentile(first, 99), "tokens": tokens,
            "tokens_per_s": tokens / elapsed, "requests_per_s": len(ok) / elapsed,
            "kinds": {kind: sum(1 for r in ok if r.kind == kind) for kind in sorted({r.kind for r in results})}}


def load_runs(args: argparse.Namespace) -> tuple[list[dict], list[Result], dict]:
    """Start the server, warm it up, run the load `repeats` times. Returns each run's figures,
    the failed results, and the server's memory and audit-log facts."""
    with tempfile.TemporaryDirectory(prefix="behemoth-serve-load-") as tmp:
        work = Path(tmp)
        model_dir = args.model or tiny_model_dir(work / "model")
        process, url, key = start_server(model_dir, work, args.max_batch_size)
        runs, errors, peak = [], [], 0.0
        try:
            warm = argparse.Namespace(**{**vars(args), "requests": 4, "clients": 2})
            asyncio.run(run_load(url, key, warm, process.pid))     # first-call costs out of the way
            rss_before = rss_mib(process.pid)
            for repeat in range(args.repeats):
                results, elapsed, run_peak = asyncio.run(run_load(url, key, args, process.pid))
                runs.append(run_stats(results, elapsed, args.requests))
                errors += [r for r in results if not r.ok]
                peak = max(peak, run_peak)
                print(f"  repeat {repeat + 1}: {runs[-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
            rss_after = rss_mib(process.pid)
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        audit = work / "keys.audit.jsonl"
        audit_lines = sum(1 for _ in audit.open()) if audit.exists() else 0
    return runs, errors, dict(rss_before=rss_before, rss_peak=peak, rss_after=rss_after, audit_lines=audit_lines)


def median_cell(runs: list[dict], key: str, fmt: str, unit: str) -> str:
    median, spread = summary([run[key] for run in runs])
    return f"{format(median, fmt)} {unit} ({spread:.0%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_arguments(parser, repeats=3)
    parser.add_argument("--model", type=Path, help="a model directory (default: tiny random model)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request is drawn up to this")
    parser.add_argument("--stream-fraction", type=float, default=0.5)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=1200, help="no new request after this many seconds")
    parser.add_argument("--request-timeout", type=float, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.clients, args.requests = 1, 8, 40
    if not (1 <= args.clients <= 256 and 1 <= args.requests <= 20000):
        raise SystemExit("--clients must be 1..256 and --requests 1..20000")
    if args.threads:  # the server is a child process: torch reads this when it starts
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    runs, errors, server = load_runs(args)
    total = {key: sum(run[key] for run in runs) for key in ("sent", "completed", "errors", "lost", "not_sent",
                                                             "duplicated")}
    kinds = {kind: sum(run["kinds"].get(kind, 0) for run in runs) for kind in runs[0]["kinds"]}
    failures = total["lost"] + total["duplicated"]  # lost counts every request without a good response
    model_name = str(args.model) if args.model else "tiny preset, random weights"
    ttft99 = median_cell(runs, "ttft99", ".3f", "s")
    requests_per_s = median_cell(runs, "requests_per_s", ".1f", "requests/s")
    body = f"""`.venv/bin/python bench/serve_load.py --clients {args.clients} --requests {args.requests} --max-tokens {args.max_tokens} --repeats {args.repeats}`
against `behemoth serve` on 127.0.0.1 ({model_name}, --max-batch-size {args.max_batch_size}); {args.repeats} load
run(s) against one warmed-up server; timings are the median over the runs, spread (max - min) / median in
brackets; counts are totals over all runs. Target: no error, lost or duplicated response.

| measure | value |
|---|---|
| requests sent / completed | {total['sent']} / {total['completed']} ({', '.join(f'{k} {v}' for k, v in kinds.items())}) |
| errors | {total['errors']} |
| lost (no complete response) / not sent (time limit) | {total['lost']} / {total['not_sent']} |
| duplicated responses | {total['duplicated']} |
| wall time per run | {median_cell(runs, 'wall', '.1f', 's')} |
| latency p50 / p99 | {median_cell(runs, 'p50', '.3f', 's')} / {median_cell(runs, 'p99', '.3f', 's')} |
| time to first token p50 / p99 (streams) | {median_cell(runs, 'ttft50', '.3f', 's')} / {ttft99} |
| completion tokens | {sum(run['tokens'] for run in runs)} |
| aggregate throughput | {median_cell(runs, 'tokens_per_s', '.1f', 'tokens/s')}, {requests_per_s} |
| server RSS before / peak / after | {server['rss_before']:.0f} / {server['rss_peak']:.0f} / {server['rss_after']:.0f} MiB |
| audit log lines | {server['audit_lines']} |
"""
    body += (f"\n**Target (no error, lost or duplicated response): {'met' if not failures else 'NOT met'}** "
             f"({failures} in {args.repeats * args.requests} requests).\n")
    if errors:
        body += "\nFirst errors:\n\n" + "\n".join(f"- #{r.index} {r.kind}: {r.error}" for r in errors[:5]) + "\n"
    rate, rate_spread = summary([run["tokens_per_s"] for run in runs])
    p99, p99_spread = summary([run["p99"] for run in runs])
    figures = [Figure("serve load: aggregate completion tokens/s", rate, "tokens/s", rate_spread, runs=len(runs)),
               Figure("serve load: latency p99", p99, "s", p99_spread, runs=len(runs)),
               Figure("serve load: failed, lost or duplicated responses", failures, "responses", None, "= 0",
                      failures == 0, runs=len(runs))]
    finish(args, "Serving load test", body, figures)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
