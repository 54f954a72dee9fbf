"""Load test of `behemoth serve` on loopback: many concurrent clients, mixed streaming and not.

    .venv/bin/python bench/serve_load.py [--model DIR] [--clients 64] [--requests 2000] [--no-write]

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
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_section  # noqa: E402

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


def start_server(model_dir: Path, work: Path, max_batch_size: int) -> tuple[subprocess.Popen, str, str]:
    from behemoth.serve.keys import Limits, create_key

    key, _ = create_key(work / "keys.json", "load-test", Limits(requests_per_minute=None, tokens_per_minute=None))
    port = free_port()
    log = (work / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "behemoth", "serve", "--model", f"bench={model_dir}", "--host", HOST,
         "--port", str(port), "--api-keys", str(work / "keys.json"), "--max-batch-size", str(max_batch_size),
         "--max-queue", "1024"], stdout=log, stderr=log)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model directory (default: tiny random model)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request is drawn up to this")
    parser.add_argument("--stream-fraction", type=float, default=0.5)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=1200, help="no new request after this many seconds")
    parser.add_argument("--request-timeout", type=float, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if not (1 <= args.clients <= 256 and 1 <= args.requests <= 20000):
        raise SystemExit("--clients must be 1..256 and --requests 1..20000")

    with tempfile.TemporaryDirectory(prefix="behemoth-serve-load-") as tmp:
        work = Path(tmp)
        model_dir = args.model or tiny_model_dir(work / "model")
        process, url, key = start_server(model_dir, work, args.max_batch_size)
        try:
            warm = argparse.Namespace(**{**vars(args), "requests": 4, "clients": 2})
            asyncio.run(run_load(url, key, warm, process.pid))     # first-call costs out of the way
            rss_before = rss_mib(process.pid)
            results, elapsed, rss_peak = asyncio.run(run_load(url, key, args, process.pid))
            rss_after = rss_mib(process.pid)
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        audit_lines = sum(1 for _ in (work / "keys.audit.jsonl").open()) if (work / "keys.audit.jsonl").exists() else 0

    ok = [r for r in results if r.ok]
    errors = [r for r in results if not r.ok]
    ids = [r.response_id for r in ok]
    duplicated = len(ids) - len(set(ids))
    lost = args.requests - len(ok)
    not_sent = args.requests - len(results)
    tokens = sum(r.completion_tokens for r in ok)
    latencies = [r.latency for r in ok]
    first = [r.first_token for r in ok if r.first_token is not None]
    by_kind = {kind: sum(1 for r in ok if r.kind == kind) for kind in sorted({r.kind for r in results})}
    model_name = str(args.model) if args.model else "tiny preset, random weights"
    body = f"""`.venv/bin/python bench/serve_load.py --clients {args.clients} --requests {args.requests} --max-tokens {args.max_tokens}`
against `behemoth serve` on 127.0.0.1 ({model_name}, --max-batch-size {args.max_batch_size}).

| measure | value |
|---|---|
| requests sent / completed | {len(results)} / {len(ok)} ({', '.join(f'{k} {v}' for k, v in by_kind.items())}) |
| errors | {len(errors)} |
| lost (no complete response) / not sent (time limit) | {lost} / {not_sent} |
| duplicated responses | {duplicated} |
| wall time | {elapsed:.1f} s |
| latency p50 / p99 | {percentile(latencies, 50):.3f} s / {percentile(latencies, 99):.3f} s |
| time to first token p50 / p99 (streams) | {percentile(first, 50):.3f} s / {percentile(first, 99):.3f} s |
| completion tokens | {tokens} |
| aggregate throughput | {tokens / elapsed:.1f} tokens/s, {len(ok) / elapsed:.1f} requests/s |
| server RSS before / peak / after | {rss_before:.0f} / {rss_peak:.0f} / {rss_after:.0f} MiB |
| audit log lines | {audit_lines} |
"""
    if errors:
        body += "\nFirst errors:\n\n" + "\n".join(f"- #{r.index} {r.kind}: {r.error}" for r in errors[:5]) + "\n"
    print(body)
    if not args.no_write:
        write_section("Serving load test", body)
    if errors or duplicated or lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
