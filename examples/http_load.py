"""A closed-loop load on an OpenAI completions endpoint: ``concurrency`` streams, each sending its next request
as soon as its last one ends, over client processes of their own (aiohttp, as vLLM's serving benchmark).

A client must never be what limits the server: one asyncio process parses a few thousand server-sent events a
second, so the streams are split over ``processes``, each started and connected before the clock starts
(a process that is still importing when the others begin would stretch the run and hide its concurrency).

    python examples/http_load.py --worker   # one client process: a job as JSON on stdin, "go" to start

:func:`closed_loop` runs the processes and returns one record per request:
``(sent, prompt tokens, output tokens, first token at, done at)`` in ``time.monotonic()`` seconds, a clock that
processes of one host share.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time


async def _run(url: str, model: str, requests: list[tuple[list[int], int]], concurrency: int) -> list:
    import aiohttp

    todo, out = list(reversed(requests)), []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        async def stream() -> None:
            while todo:
                prompt, n = todo.pop()
                body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                        "stream": True, "return_token_ids": True}
                sent, first, tokens = time.monotonic(), None, 0
                async with session.post("/v1/completions", json=body) as r:
                    r.raise_for_status()
                    async for line in r.content:
                        if line.startswith(b"data: {"):
                            got = len(json.loads(line[6:])["choices"][0]["token_ids"])
                            if got and first is None:
                                first = time.monotonic()
                            tokens += got
                out.append((sent, len(prompt), tokens, first, time.monotonic()))

        async def connect() -> None:
            async with session.get("/health") as r:
                await r.read()

        # connect every stream before the start, so the first wave does not also time the TCP handshakes
        await asyncio.gather(*(connect() for _ in range(concurrency)))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await asyncio.gather(*(stream() for _ in range(concurrency)))
    return out


def worker() -> None:
    job = json.loads(sys.stdin.readline())
    rows = asyncio.run(_run(job["url"], job["model"], job["requests"], job["concurrency"]))
    print(json.dumps(rows), flush=True)


def closed_loop(url: str, model: str, requests: list[tuple[list[int], int]], concurrency: int, processes: int) -> list:
    """Send ``requests`` (token-id prompt, new tokens) for ``model`` with ``concurrency`` streams over
    ``processes`` client processes; the records."""
    k = min(processes, concurrency)
    procs = [subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(k)]
    for i, p in enumerate(procs):
        p.stdin.write(json.dumps({"url": url, "model": model, "requests": requests[i::k],
                                  "concurrency": len(range(i, concurrency, k))}) + "\n")
        p.stdin.flush()
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"a client process failed to start (exit code {p.wait()})")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    rows = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"a client process failed (exit code {p.returncode}); its error is above")
        rows += json.loads(out)
    return rows


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker()
