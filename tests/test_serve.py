"""``shiftlib serve``: the OpenAI API over ranks in lockstep, as a client sees it.

Each server is started the way a user starts it (torchrun, the tiny checkpoint, float64 so that every mesh
gives the same greedy tokens) once per mesh, and the checks of its class run against it (starting a server on
loaded CPUs takes a while); the official ``openai`` client talks to it. The last check of a class may stop it:
with SIGTERM (every rank exits 0) or by killing a rank (the server exits non-zero).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NEW = 10
PROMPTS = ["Hello world", "Shift parallelism is", "The quick brown fox jumps over"]
# Each mesh's server also carries the flags of the checks that run on it. 1x2 is started rank by rank, as torchrun
# does, to see every rank's exit code (torchrun reports only its own: 1 after a signal, whatever the ranks did).
MESHES = {
    "2x1": (["--tp", "2", "--sp", "1", "--max-num-seqs", "1", "--max-waiting", "1"], True),
    "1x2": (["--tp", "1", "--sp", "2", "--threshold", "8", "--shutdown-timeout", "6", "--speculative", "suffix"], False),
    "2x2": (["--tp", "2", "--sp", "2", "--threshold", "8", "--num-blocks", "48"], True),  # cache < context
}
START_TIMEOUT_S = 300


class Server:
    """A server started as a user starts it (``torchrun``, or each rank by hand to see every exit code)."""

    def __init__(self, args: list[str], world: int, home: Path, torchrun: bool = True) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        env.update(SHIFTLIB_HOME=str(home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]))
        command = [sys.executable, "-m", "shiftlib", "serve", "--model", "tiny", "--dtype", "float64", "--port", "0",
                   *args]
        if torchrun:
            envs = [env]
            commands = [[sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), *command[1:]]]
        else:
            port = _free_port()
            envs = [{**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE":
                     str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} for r in range(world)]
            commands = [command] * world
        self.procs = [subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                      for c, e in zip(commands, envs)]
        self.lines: list[str] = []
        self._ready = threading.Event()
        for p in self.procs:
            threading.Thread(target=self._read, args=(p,), daemon=True).start()
        if not self._ready.wait(START_TIMEOUT_S):
            self.kill()
            pytest.fail("the server did not start:\n" + self.output)
        self.url = re.search(r" on (http://\S+) ", next(x for x in self.lines if " on http://" in x)).group(1)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line)
            if line.startswith("shiftlib serve: ") and " on http://" in line:
                self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def metrics(self) -> dict[tuple, float]:
        """``(sample name, label values...) -> value`` from ``/metrics``."""
        text = self.http.get("/metrics").text
        return {(s.name, *(v for k, v in sorted(s.labels.items()) if k != "model_name")): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def pids(self) -> list[int]:
        """Every process of the server: launcher, ranks, the HTTP process."""
        todo, seen = [p.pid for p in self.procs], []
        while todo:
            pid = todo.pop()
            seen.append(pid)
            for task in os.listdir(f"/proc/{pid}/task"):
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        return seen

    def signal(self, sig: int) -> None:
        for p in self.procs:
            p.send_signal(sig)

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        return [p.wait(max(deadline - time.monotonic(), 0.1)) for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait(30)

    def stop(self) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("the server did not stop on SIGTERM:\n" + self.output)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- references: shiftlib.generate on one rank, each prompt alone -------------------------------------------------

_models: dict = {}


def _generate_alone(path: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    import shiftlib

    if path not in _models:
        _models[path] = shiftlib.from_pretrained(path, shiftlib.init_mesh(1, 1, "cpu"), dtype="float64")
    return [shiftlib.generate(_models[path], [p], max_new_tokens=n)[0] for p in prompts]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shiftlib_home")


@pytest.fixture(scope="module")
def tiny(home) -> Path:
    from shiftlib.checkpoint import tiny_checkpoint

    return tiny_checkpoint(home)


@pytest.fixture(scope="module")
def tok(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


def chat_ids(tok, text: str) -> list[int]:
    return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False))


@pytest.fixture(scope="module")
def reference(ranks, tiny, tok) -> dict:
    prompts = [tok.encode(p) for p in PROMPTS] + [chat_ids(tok, p) for p in PROMPTS]
    (outputs,) = ranks(1).run(_generate_alone, str(tiny), prompts, NEW)
    return {"completion": outputs[: len(PROMPTS)], "chat": outputs[len(PROMPTS):]}


def _ask(server: Server, kind: str, prompt: str, stream: bool, **extra):
    body = dict(model="tiny", max_tokens=NEW, temperature=0, extra_body={"return_token_ids": True, **extra})
    if kind == "chat":
        r = server.client.chat.completions.create(messages=[{"role": "user", "content": prompt}], stream=stream,
                                                  **({"stream_options": {"include_usage": True}} if stream else {}),
                                                  **body)
    else:
        r = server.client.completions.create(prompt=prompt, stream=stream,
                                             **({"stream_options": {"include_usage": True}} if stream else {}), **body)
    if not stream:
        c = r.choices[0]
        return c.message.content if kind == "chat" else c.text, c.token_ids, c.finish_reason, r.usage
    chunks = list(r)
    choices = [c.choices[0] for c in chunks if c.choices]
    text = "".join((c.delta.content or "") if kind == "chat" else c.text for c in choices)
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    return text, [t for c in choices for t in c.token_ids], choices[-1].finish_reason, chunks[-1].usage


def _wait_until(check, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def _stream_in_thread(url: str, body: dict) -> tuple[threading.Thread, list]:
    events: list = []

    def run() -> None:
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, events


BAD_REQUESTS = [  # (endpoint, body, the field named in the error)
    ("completions", b"{not json", None),
    ("completions", b"[1, 2]", None),
    ("completions", {"model": "gpt-4", "prompt": "hi"}, "model"),
    ("completions", {"prompt": [5] * 1000, "max_tokens": 100}, "max_tokens"),  # over the context of 1024
    ("completions", {"prompt": [5] * 700, "max_tokens": 100}, "max_tokens"),  # over the cache of 768 tokens
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [5, 999999]}, "prompt"),
    ("completions", {}, "prompt"),
    ("completions", {"prompt": "hi", "temperature": 3}, "temperature"),
    ("completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("completions", {"prompt": "hi", "n": 0}, "n"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ("completions", {"prompt": "hi", "logprobs": 50}, "logprobs"),
    ("completions", {"prompt": "hi", "stop": [""]}, "stop"),
    ("completions", {"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids"),
    ("completions", {"prompt": "hi", "min_tokens": 20, "max_tokens": 5}, "min_tokens"),
    ("completions", {"prompt": "hi", "echo": True}, "echo"),
    ("completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
]


class Serving:
    """What every mesh serves; each subclass starts one server (``mesh``) and adds the checks it carries."""

    mesh = ""

    @pytest.fixture(scope="class")
    def server(self, home, tiny):
        tp, sp = (int(x) for x in self.mesh.split("x"))
        args, torchrun = MESHES[self.mesh]
        s = Server(args, tp * sp, home, torchrun)
        yield s
        if all(p.poll() is None for p in s.procs):  # a class's last check may have stopped it already
            s.stop()

    @pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
    @pytest.mark.parametrize("kind", ["completion", "chat"])
    def test_greedy_answers_equal_shiftlib_generate(self, server, reference, tok, kind, stream):
        for prompt, want in zip(PROMPTS, reference[kind]):
            text, tokens, finish, usage = _ask(server, kind, prompt, stream)
            assert tokens == want
            assert text == tok.decode(want, skip_special_tokens=True)
            assert finish == ("stop" if want[-1] == tok.eos_token_id else "length")
            prompt_len = len(chat_ids(tok, prompt) if kind == "chat" else tok.encode(prompt))
            assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_len, len(want))


class TestTwoRanksTP(Serving):
    mesh = "2x1"

    def test_a_full_queue_answers_503_with_retry_after(self, server):
        long = {"model": "tiny", "prompt": "Hello", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=server.url, timeout=60) as c1, httpx.Client(base_url=server.url, timeout=60) as c2:
            with c1.stream("POST", "/v1/completions", json=long) as running:
                lines = running.iter_lines()  # kept: a dropped iterator closes the connection (an abort)
                assert next(lines).startswith("data: ")  # running (--max-num-seqs 1)
                with c2.stream("POST", "/v1/completions", json=long) as waiting:  # waiting: the queue is full
                    assert _wait_until(lambda: server.metrics()[("shiftlib:num_requests_waiting",)] == 1)
                    r = server.http.post("/v1/completions", json=long)
                    assert r.status_code == 503 and r.headers["retry-after"] == "1"
                    assert "--max-waiting" in r.json()["error"]["message"]
                    assert waiting.status_code == 200
        assert _wait_until(lambda: server.metrics()[("shiftlib:num_requests_running",)] == 0)
        assert server.http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2}).status_code == 200

    def test_a_killed_rank_stops_the_server_with_an_error_within_seconds(self, server):
        stream, events = _stream_in_thread(server.url, {"prompt": "Hi", "max_tokens": 1000, "ignore_eos": True})
        assert _wait_until(lambda: events)
        environ = {p: Path(f"/proc/{p}/environ").read_bytes().split(b"\0") for p in server.pids()}
        (rank1,) = [p for p, env in environ.items() if b"RANK=1" in env and b"LOCAL_RANK=1" in env]
        start = time.monotonic()
        os.kill(rank1, signal.SIGKILL)
        (code,) = server.wait(30)
        took = time.monotonic() - start
        stream.join(10)
        assert code != 0 and took < 15, (code, took, server.output)
        assert not stream.is_alive() and "error" in json.loads(events[-2]) and events[-1] == "[DONE]"


class TestTwoRanksSP(Serving):
    mesh = "1x2"

    def test_speculation_drafts_and_its_metrics_count_them(self, server, reference):
        repeated = "the quick brown fox " * 6  # drafts come from the prompt
        for _ in range(2):
            server.client.completions.create(model="tiny", prompt=repeated, max_tokens=12, temperature=0)
        m = server.metrics()
        drafted, accepted = (m[(f"shiftlib:spec_decode_num_{x}_tokens_total",)] for x in ("draft", "accepted"))
        assert drafted > 0 and 0 <= accepted <= drafted

    def test_step_metrics_count_every_step_verify_steps_included(self, server):
        """A request alone gets one token a step plus the draft tokens the step accepted, so its tokens are the
        steps plus the accepted tokens: a step the metrics missed (one call can read two) breaks it."""
        def totals() -> tuple[float, float]:
            m = server.metrics()
            return (sum(v for k, v in m.items() if k[0] == "shiftlib:steps_total"),
                    m[("shiftlib:spec_decode_num_accepted_tokens_total",)])

        before = totals()
        server.client.completions.create(model="tiny", prompt="the quick brown fox " * 6, max_tokens=24,
                                         temperature=0, extra_body={"ignore_eos": True})
        steps, accepted = (a - b for a, b in zip(totals(), before))
        assert accepted > 0 and steps + accepted == 24

    def test_models_health_and_unknown_routes(self, server):
        assert [m.id for m in server.client.models.list().data] == ["tiny"]
        assert server.http.get("/health").status_code == 200
        r = server.http.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["message"]

    def test_sigterm_finishes_requests_in_flight_then_every_rank_exits_0(self, server):
        short, short_events = _stream_in_thread(server.url, {"prompt": "Hello", "max_tokens": 30, "ignore_eos": True,
                                                             "return_token_ids": True})
        long, long_events = _stream_in_thread(server.url, {"prompt": "Hi", "max_tokens": 1000, "ignore_eos": True})
        assert _wait_until(lambda: short_events and long_events)
        server.signal(signal.SIGTERM)  # as torchrun does: every rank gets it
        start = time.monotonic()
        assert _wait_until(lambda: server.http.get("/health").status_code == 503, 5)
        assert server.http.post("/v1/completions", json={"prompt": "late"}).status_code == 503
        assert server.wait(6 + 30) == [0, 0], server.output  # --shutdown-timeout 6, then a slow machine's exit
        took = time.monotonic() - start
        short.join(10), long.join(10)
        finished = [json.loads(e) for e in short_events[:-1]]
        assert short_events[-1] == "[DONE]" and finished[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(f["choices"][0]["token_ids"]) for f in finished) == 30  # every token (drafts: several a chunk)
        assert "shut down before this request finished" in long_events[-2] and long_events[-1] == "[DONE]"
        assert took < 6 + 30


class TestFourRanks(Serving):
    mesh = "2x2"

    def test_concurrent_staggered_streams_each_get_the_tokens_they_get_alone(self, server, tiny, tok, ranks):
        prompts = [f"Request {i}:" + " the quick brown fox" * (i % 5 + 4) for i in range(32)]
        (want,) = ranks(1).run(_generate_alone, str(tiny), [tok.encode(p) for p in prompts], 12)

        async def one(client, i: int) -> list[int]:
            await asyncio.sleep(0.02 * i)
            stream = await client.completions.create(model="tiny", prompt=prompts[i], max_tokens=12, temperature=0,
                                                     stream=True, extra_body={"return_token_ids": True})
            return [t async for chunk in stream for t in chunk.choices[0].token_ids]

        async def all_of_them() -> list[list[int]]:
            async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as client:
                return await asyncio.gather(*(one(client, i) for i in range(len(prompts))))

        assert asyncio.run(all_of_them()) == want
    
    def test_the_benchmarks_load_generator_keeps_every_stream_in_flight(self, server):
        sys.path.insert(0, str(ROOT / "examples"))
        from http_load import closed_loop

        rows = closed_loop(server.url, "tiny", [([1 + i, 2, 3, 4], 6) for i in range(12)], concurrency=4, processes=2)
        assert sorted(r[1:3] for r in rows) == [[4, 6]] * 12  # every request, with all its tokens
        assert all(sent <= first <= done for sent, _, _, first, done in rows)
        changes = sorted([(r[0], 1) for r in rows] + [(r[4], -1) for r in rows])
        assert max(itertools.accumulate(d for _, d in changes)) == 4

    def test_a_client_that_leaves_has_its_request_aborted_and_blocks_freed(self, server, reference):
        long = {"model": "tiny", "prompt": "Hello", "max_tokens": 500, "ignore_eos": True, "temperature": 0}
        with server.http.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
            lines = r.iter_lines()
            assert sum(line.startswith("data: ") for line, _ in zip(lines, range(6))) == 3  # three chunks
            m = server.metrics()
            assert m[("shiftlib:num_requests_running",)] == 1 and m[("shiftlib:kv_cache_usage_perc",)] > 0
        # gone mid-stream (the connection closed): aborted on every rank, blocks freed; the others go on
        assert _wait_until(lambda: server.metrics()[("shiftlib:kv_cache_usage_perc",)] == 0)
        assert _ask(server, "completion", PROMPTS[0], stream=False)[1] == reference["completion"][0]
        with pytest.raises(httpx.TimeoutException):  # a whole answer, the client gives up waiting
            server.http.post("/v1/completions", json=long, timeout=1.5)
        assert _wait_until(lambda: server.metrics()[("shiftlib:num_requests_running",)] == 0)
        assert server.metrics()[("shiftlib:request_success_total", "abort")] == 2

    def test_every_bad_request_gets_a_400_that_names_it_and_the_next_request_succeeds(self, server, reference):
        for endpoint, body, param in BAD_REQUESTS:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = server.http.post(f"/v1/{endpoint}", headers={"content-type": "application/json"}, **kw)
            error = r.json()["error"]
            assert r.status_code == 400 and error["type"] == "invalid_request_error", (body, r.text)
            assert error["param"] == param and len(error["message"]) > 20, (body, error)
        assert _ask(server, "completion", PROMPTS[1], stream=False)[1] == reference["completion"][1]  # unharmed
        with pytest.raises(openai.BadRequestError, match="is not served here"):
            server.client.completions.create(model="gpt-4", prompt="hi")

    def test_stop_strings_across_tokens_n_choices_and_logprobs(self, server, tok, tiny):
        from transformers import AutoModelForCausalLM
        import torch

        text, tokens, _, _ = _ask(server, "completion", PROMPTS[2], stream=False)
        full = tok.decode(tokens, skip_special_tokens=True)
        # a stop string across the boundary of tokens 4 and 5 (the first place it occurs there)
        at = next(len(tok.decode(tokens[:i])) for i in range(4, NEW) if tok.decode(tokens[:i]).isprintable()
                  and full.find(full[len(tok.decode(tokens[:i])) - 1 : len(tok.decode(tokens[:i])) + 1])
                  == len(tok.decode(tokens[:i])) - 1)
        stop = full[at - 1 : at + 1]
        for stream in (False, True):
            got, _, finish, _ = _ask(server, "completion", PROMPTS[2], stream, stop=[stop, "\u2603never"])
            assert (got, finish) == (full[: at - 1], "stop")

        sampled = [server.client.completions.create(model="tiny", prompt="Hello", n=3, max_tokens=8, temperature=1.0,
                                                    seed=5) for _ in range(2)]
        texts = [[c.text for c in sorted(r.choices, key=lambda c: c.index)] for r in sampled]
        assert texts[0] == texts[1] and len(set(texts[0])) > 1 and sampled[0].usage.completion_tokens == 24
        greedy = server.client.completions.create(model="tiny", prompt=PROMPTS[2], n=2, max_tokens=NEW, temperature=0)
        assert [c.text for c in greedy.choices] == [text, text]

        r = server.client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=NEW, temperature=0, logprobs=3,
                                             extra_body={"return_tokens_as_token_ids": True})
        model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float64)
        prompt = tok.encode(PROMPTS[2])
        with torch.no_grad():
            lp = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        got = r.choices[0].logprobs
        assert got.tokens == [f"token_id:{t}" for t in tokens]
        assert got.token_logprobs == pytest.approx([lp[i, t].item() for i, t in enumerate(tokens)], abs=1e-9)
        for i, top in enumerate(got.top_logprobs):
            values, ids = lp[i].topk(3)
            assert top == pytest.approx({f"token_id:{t}": v for t, v in zip(ids.tolist(), values.tolist())}, abs=1e-9)
        chat = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
        content = chat.choices[0].logprobs.content
        assert len(content) == 4 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)

    def test_metrics_count_steps_and_tokens_per_mode(self, server):
        m = server.metrics()
        assert m[("shiftlib:steps_total", "sp")] > 0 and m[("shiftlib:steps_total", "tp")] > 0  # threshold 8
        assert m[("shiftlib:step_tokens_total", "sp")] > 8 * m[("shiftlib:steps_total", "sp")] - 1
        for mode in ("tp", "sp"):  # prompts ran in either mode, and decodes alone in either (32 streams > 8)
            assert 0 < m[("shiftlib:prefill_steps_total", mode)] < m[("shiftlib:steps_total", mode)], mode
        assert m[("shiftlib:mode_threshold_tokens",)] == 8
        assert m[("shiftlib:prompt_tokens_total",)] > 0 and m[("shiftlib:generation_tokens_total",)] > 0
        for name in ("time_to_first_token", "inter_token_latency", "e2e_request_latency", "request_queue_time",
                     "request_sync"):
            assert m[(f"shiftlib:{name}_seconds_count",)] > 0, name

    def test_an_idle_server_sleeps(self, server):
        pids = server.pids()
        before = {p: _cpu_seconds(p) for p in pids}
        time.sleep(3)
        used = {p: _cpu_seconds(p) - before[p] for p in pids}
        assert max(used.values()) < 0.3, used  # a spinning core would use about 3 s
