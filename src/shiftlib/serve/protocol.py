"""OpenAI's request shapes, checked: what a client may send, and what the engine is asked to do for it.

A request that cannot be served is refused here, before it reaches any rank, with a :class:`RequestError`
that names the field, the problem and the fix (HTTP 400 in OpenAI's error JSON). Defaults come from the
model's ``generation_config.json`` (``temperature``, ``top_p``, ``top_k``, ``max_new_tokens``), then from
OpenAI's API (temperature 1, completions 16 tokens, chat up to the context).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shiftlib.engine.sampler import SamplingParams

MAX_LOGPROBS = 20
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP status, the rest fills OpenAI's error object."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """Fields shared by both endpoints; unknown fields are ignored, as most OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extras, as vLLM spells them
    top_k: int | None = Field(None, ge=-1)
    ignore_eos: bool = False
    stop_token_ids: list[int] = []
    min_tokens: int = Field(0, ge=0)
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False
    # in OpenAI's API but not served here: accepted only at their neutral values
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    echo: bool = False
    suffix: str | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


_NEUTRAL = {
    "presence_penalty": lambda v, r: v == 0,
    "frequency_penalty": lambda v, r: v == 0,
    "logit_bias": lambda v, r: not v,
    "best_of": lambda v, r: v is None or v == r.n,
    "echo": lambda v, r: not v,
    "suffix": lambda v, r: not v,
    "tools": lambda v, r: not v,
    "response_format": lambda v, r: v is None or v.get("type") == "text",
}


@dataclass(frozen=True)
class Limits:
    """What the running engine can take: sent by rank 0 once the model is loaded."""

    max_context: int
    cache_tokens: int
    vocab_size: int


@dataclass(frozen=True)
class Job:
    """A checked request: its prompts and, for each of its ``len(prompts) * n`` choices, the engine's params."""

    kind: Literal["completion", "chat"]
    prompts: list[list[int]]
    params: list[SamplingParams]  # choice i = prompt i // n, sample i % n
    n: int
    stops: list[str]
    stream: bool
    include_usage: bool
    return_token_ids: bool
    tokens_as_ids: bool

    def prompt_of(self, choice: int) -> list[int]:
        return self.prompts[choice // self.n]


def generation_defaults(model_dir: Path) -> dict:
    """The sampling defaults of the model's ``generation_config.json`` (the values vLLM takes from it too)."""
    path = Path(model_dir) / "generation_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: config[k] for k in ("temperature", "top_p", "top_k", "max_new_tokens") if config.get(k) is not None}


def _field(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def prepare(body: Any, kind: str, tokenizer, limits: Limits, defaults: dict, model_name: str) -> Job:
    """Check a decoded JSON body and turn it into a :class:`Job`.

    Raises:
        RequestError: anything the engine cannot serve as asked.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        req = (CompletionRequest if kind == "completion" else ChatRequest).model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        name = _field(err["loc"])
        raise RequestError(f"invalid {name or 'request'}: {err['msg']}", name or None) from None
    if req.model is not None and req.model != model_name:
        raise RequestError(f"model {req.model!r} is not served here: ask for {model_name!r} (see GET /v1/models)",
                           "model", "model_not_found")
    for name, neutral in _NEUTRAL.items():
        if not neutral(getattr(req, name), req):
            raise RequestError(f"{name} is not supported by this server: leave it out", name)
    if req.stream_options is not None and not req.stream:
        raise RequestError("stream_options needs stream: true", "stream_options")
    if isinstance(req, ChatRequest):
        prompts = [_chat_prompt(tokenizer, req.messages)]
        top = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        max_tokens = req.max_completion_tokens or req.max_tokens
    else:
        prompts = _completion_prompts(tokenizer, req.prompt)
        top, max_tokens = req.logprobs, req.max_tokens
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stops):
        raise RequestError("stop strings must not be empty", "stop")
    vocab = limits.vocab_size
    if any(not 0 <= t < vocab for t in req.stop_token_ids):
        raise RequestError(f"stop_token_ids must be token ids in [0, {vocab})", "stop_token_ids")
    params = []
    for prompt in prompts:
        n = _check_prompt(prompt, limits)
        wanted = max_tokens or defaults.get("max_new_tokens")
        if wanted is None:
            wanted = COMPLETION_MAX_TOKENS if kind == "completion" else min(limits.max_context, limits.cache_tokens) - n
        _check_room(n, wanted, limits, given=max_tokens is not None)
        if req.min_tokens > wanted:
            raise RequestError(f"min_tokens={req.min_tokens} is larger than max_tokens={wanted}: lower min_tokens",
                               "min_tokens")
        base = SamplingParams(
            max_new_tokens=wanted,
            temperature=req.temperature if req.temperature is not None else defaults.get("temperature", 1.0),
            top_p=req.top_p if req.top_p is not None else defaults.get("top_p", 1.0),
            top_k=max(req.top_k if req.top_k is not None else defaults.get("top_k", 0), 0),
            stop_token_ids=tuple(req.stop_token_ids),
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            logprobs=top,
        )
        params += [replace(base, seed=None if req.seed is None else req.seed + len(params) + j) for j in range(req.n)]
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Job(kind, prompts, params, req.n, stops, req.stream, include_usage, req.return_token_ids,
               req.return_tokens_as_token_ids)


def _completion_prompts(tokenizer, prompt) -> list[list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt or any(len(p) == 0 for p in prompt):
        raise RequestError("prompt is empty: send a string, a list of token ids, or a list of either", "prompt")
    return [list(tokenizer.encode(p)) if isinstance(p, str) else list(p) for p in prompt]


def _chat_prompt(tokenizer, messages: list[Message]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model's tokenizer has no chat template: use /v1/completions", "messages")
    turns = []
    for i, m in enumerate(messages):
        parts = m.content if isinstance(m.content, list) else [ContentPart(type="text", text=m.content or "")]
        if any(p.type != "text" or p.text is None for p in parts):
            raise RequestError(f"messages[{i}] has content that is not text: this server reads text parts only",
                               f"messages[{i}].content")
        turns.append({"role": m.role, "content": "".join(p.text for p in parts)})
    try:
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as e:  # noqa: BLE001 - a template that rejects these messages is the request's problem
        raise RequestError(f"the chat template cannot format these messages: {e}", "messages") from None
    return list(ids)


def _check_prompt(prompt: list[int], limits: Limits) -> int:
    if min(prompt) < 0 or max(prompt) >= limits.vocab_size:
        raise RequestError(f"prompt has token ids outside the vocabulary [0, {limits.vocab_size}): send ids of "
                           f"this model's tokenizer", "prompt")
    return len(prompt)


def _check_room(n: int, max_tokens: int, limits: Limits, given: bool) -> None:
    for room, what, fix in ((limits.max_context, "the model's context", "shorten the prompt"),
                            (limits.cache_tokens, "the KV cache", "shorten the prompt (or start the server with "
                                                                  "more --num-blocks or --memory-fraction)")):
        if n + max_tokens > room or max_tokens < 1:
            asked = f"max_tokens={max_tokens}" if given else f"{max(max_tokens, 0)} new tokens"
            raise RequestError(f"prompt of {n} tokens + {asked} does not fit {what} of {room} tokens: {fix} or "
                               f"lower max_tokens", "max_tokens" if given else "prompt")
