"""The HTTP routes, as OpenAI's API has them: completions and chat (streamed as server-sent events, or whole),
models, health and metrics.

A request is checked (:mod:`shiftlib.serve.protocol`), its choices are submitted to the engine, and each step's
tokens come back through a queue; the text is produced as they come (:mod:`shiftlib.serve.detokenize`). A
client that goes away, streaming or not, has its requests aborted on every rank at once. A stop string ends a
choice here: its request is aborted in the engine, which frees its cache blocks.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from shiftlib.serve.detokenize import TextStream, decoder
from shiftlib.serve.frontend import EngineLink, FrontendConfig, Output
from shiftlib.serve.metrics import ServerMetrics
from shiftlib.serve.protocol import Job, RequestError, prepare

RETRY_AFTER_S = 1


class ChoiceFailed(Exception):
    def __init__(self, output: Output) -> None:
        super().__init__(output.error)
        self.error = RequestError(output.error, status=output.status)


@dataclass
class Choice:
    index: int
    text: TextStream
    tokens: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # (token, logprob, top, text offset) per token
    finish: str | None = None
    announced: bool = False  # chat: the first chunk carries the role
    first_at: float | None = None
    last_at: float = 0.0
    length: int = 0  # characters of text so far


@dataclass
class Delta:
    index: int
    text: str
    tokens: list[int]
    logprobs: list
    finish: str | None


class JobRun:
    """One HTTP request in the engine: its choices, the queue their tokens arrive on, and the text so far."""

    def __init__(self, job: Job, link: EngineLink, decode, metrics: ServerMetrics) -> None:
        self.job, self.link, self.metrics = job, link, metrics
        self.id, self.created = f"{'chatcmpl' if job.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        self.arrival = time.monotonic()
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self.choices = [Choice(i, TextStream(decode, job.prompt_of(i), job.stops, p.min_tokens))
                        for i, p in enumerate(job.params)]
        self.uids = link.submit([job.prompt_of(i) for i in range(len(job.params))], job.params, self.queue,
                                self.arrival)
        self.open = len(self.choices)

    async def deltas(self) -> AsyncIterator[list[Delta]]:
        """The choices' new text and tokens, step by step, until all are finished; aborts the rest if left."""
        try:
            while self.open:
                batch = [await self.queue.get()]
                while not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                yield [d for d in map(self._apply, batch) if d is not None]
        finally:
            left = [uid for uid, c in zip(self.uids, self.choices) if c.finish is None]
            self.link.abort(left)
            for _ in left:  # the client went away, or the engine failed
                self.metrics.finish("abort", time.monotonic() - self.arrival)

    def _apply(self, out: Output) -> Delta | None:
        c = self.choices[out.index]
        if c.finish is not None:
            return None
        if out.error is not None:
            raise ChoiceFailed(out)
        now = time.monotonic()
        if c.first_at is None:
            c.first_at = now
            self.metrics.ttft.observe(now - self.arrival)
        elif out.tokens:
            gap = (now - c.last_at) / len(out.tokens)
            for _ in out.tokens:
                self.metrics.itl.observe(gap)
        c.last_at = now
        self.metrics.generation_tokens.inc(len(out.tokens))
        entries = [(t, lp, top, c.length) for t, (lp, top) in zip(out.tokens, out.logprobs or [])]
        text = c.text.add(out.tokens)
        finish = out.finish
        if c.text.stopped:
            finish = "stop"
            if out.finish is None:
                self.link.abort([self.uids[out.index]])  # frees its blocks now; later tokens are dropped
        elif finish is not None:
            text += c.text.finish()
        c.tokens += out.tokens
        c.logprobs += entries
        c.pieces.append(text)
        c.length += len(text)
        if finish is not None:
            c.finish = finish
            self.open -= 1
            self.metrics.finish(finish, now - self.arrival)
        return Delta(out.index, text, out.tokens, entries, finish)

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.job.prompts)
        completion = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def build_app(link: EngineLink, tokenizer, defaults: dict, config: FrontendConfig, metrics: ServerMetrics) -> FastAPI:
    """The FastAPI application of the HTTP process."""
    decode = decoder(tokenizer)
    token_text = functools.lru_cache(maxsize=1 << 16)(lambda t: decode([t]))
    name, created = config.model_name, int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        link.attach(asyncio.get_running_loop())
        yield

    app = FastAPI(title="shiftlib", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # unknown routes, wrong methods
        return JSONResponse(RequestError(str(e.detail), code=str(e.status_code)).body(), status_code=e.status_code)

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": link.state}, status_code=200 if link.state == "serving" else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        limits = link.limits
        card = {"id": name, "object": "model", "created": created, "owned_by": "shiftlib", "root": config.model_dir}
        if limits is not None:
            card["max_model_len"] = limits.max_context
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await serve(request, "chat")

    async def serve(request: Request, kind: str) -> Response:
        try:
            body = await request.body()
            try:
                payload = json.loads(body)
            except ValueError as e:
                raise RequestError(f"the request body is not valid JSON ({e}): send one JSON object") from None
            if link.state != "serving":
                raise RequestError(f"the server is {link.state}, not serving: retry on another replica or later",
                                   code="unavailable", status=503)
            job = prepare(payload, kind, tokenizer, link.limits, defaults, name)
            if len(link.waiting) + len(job.params) > config.max_waiting:
                raise RequestError(f"the server's queue is full ({len(link.waiting)} requests waiting, "
                                   f"--max-waiting {config.max_waiting}): retry after a while",
                                   code="overloaded", status=503)
        except RequestError as e:
            headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
            return JSONResponse(e.body(), status_code=e.status, headers=headers)
        run = JobRun(job, link, decode, metrics)
        text_of = (lambda t: f"token_id:{t}") if job.tokens_as_ids else token_text
        shape = Shapes(kind, name, text_of, job.return_token_ids)
        if job.stream:
            return EventSourceResponse(_events(run, shape))
        return await _whole(run, shape, request)

    return app


async def _events(run: JobRun, shape: Shapes) -> AsyncIterator[bytes]:
    """The server-sent events of a streamed request: a chunk per choice and step, usage, ``[DONE]``."""
    usage = {"usage": None} if run.job.include_usage else {}
    try:
        async for deltas in run.deltas():
            for d in deltas:
                yield format_sse_event(data_str=json.dumps({**shape.chunk(run, d), **usage}))
        if run.job.include_usage:
            yield format_sse_event(data_str=json.dumps({**shape.head(run, chunk=True), "choices": [],
                                                        "usage": run.usage()}))
    except ChoiceFailed as e:
        yield format_sse_event(data_str=json.dumps(e.error.body()))
    yield format_sse_event(data_str="[DONE]")


async def _whole(run: JobRun, shape: Shapes, request: Request) -> Response:
    """A request answered in one response; if the client leaves first, its requests are aborted."""
    async def consume() -> None:
        async for _ in run.deltas():
            pass

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(consume()), asyncio.ensure_future(gone())
    await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    watch.cancel()
    if not work.done():
        work.cancel()
        return Response(status_code=499)  # nobody reads it
    try:
        work.result()
    except ChoiceFailed as e:
        return JSONResponse(e.error.body(), status_code=e.error.status)
    return JSONResponse({**shape.head(run, chunk=False), "choices": [shape.choice(run, c) for c in run.choices],
                         "usage": run.usage()})


@dataclass(frozen=True)
class Shapes:
    """The JSON of OpenAI's completion and chat responses and chunks."""

    kind: str
    model: str
    token_text: object
    token_ids: bool

    def head(self, run: JobRun, chunk: bool) -> dict:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.kind == "chat" else "text_completion"
        return {"id": run.id, "object": obj, "created": run.created, "model": self.model}

    def chunk(self, run: JobRun, d: Delta) -> dict:
        choice: dict = {"index": d.index}
        if self.kind == "chat":
            c = run.choices[d.index]
            choice["delta"] = {"content": d.text} if c.announced else {"role": "assistant", "content": d.text}
            c.announced = True
        else:
            choice["text"] = d.text
        choice["logprobs"] = self._logprobs(d.logprobs) if run.job.params[d.index].logprobs is not None else None
        choice["finish_reason"] = d.finish
        if self.token_ids:
            choice["token_ids"] = d.tokens
        return {**self.head(run, chunk=True), "choices": [choice]}

    def choice(self, run: JobRun, c: Choice) -> dict:
        text = "".join(c.pieces)
        out: dict = {"index": c.index}
        if self.kind == "chat":
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["text"] = text
        out["logprobs"] = self._logprobs(c.logprobs) if run.job.params[c.index].logprobs is not None else None
        out["finish_reason"] = c.finish
        if self.token_ids:
            out["token_ids"], out["prompt_token_ids"] = c.tokens, run.job.prompt_of(c.index)
        return out

    def _logprobs(self, entries: list) -> dict:
        text = self.token_text
        if self.kind == "chat":
            def item(t: int, lp: float) -> dict:
                s = text(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}

            return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]}
                                for t, lp, top, _ in entries]}
        return {"tokens": [text(t) for t, *_ in entries], "token_logprobs": [lp for _, lp, _, _ in entries],
                "top_logprobs": [{text(i): v for i, v in top} for _, _, top, _ in entries],
                "text_offset": [off for *_, off in entries]}
