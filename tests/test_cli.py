"""The ``shiftlib`` command: generate (one rank and under torchrun), info, and one clear line for each mistake."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from shiftlib.cache import PagedKVCache
from shiftlib.checkpoint import write_tiny
from shiftlib.cli import _bytes, main
from shiftlib.loading import parameter_bytes_per_rank
from shiftlib.mesh import HeadMap
from test_loading import BAD_CHECKPOINTS, broken_copy

NEW = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("tiny"))


def _main(argv: list[str]) -> tuple[int, str, str]:
    """Run the command in a rank's process; return its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def hf_greedy(path: Path, ids: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    return model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n)[0, len(ids):].tolist()


# -- generate ----------------------------------------------------------------------------------------------


def test_generate_prints_each_prompt_and_its_greedy_completion(ranks, tiny):
    ((code, out, err),) = ranks(1).run(_main, ["generate", "--model", str(tiny), "--prompt", "Hello world", "--prompt",
                                               "The quick brown", "--max-new-tokens", str(NEW), "--dtype", "float64"])
    assert code == 0, err
    tok = AutoTokenizer.from_pretrained(tiny)
    want = "".join(f"=== prompt {i}: {p}\n{tok.decode(hf_greedy(tiny, tok.encode(p), NEW), skip_special_tokens=True)}\n"
                   for i, p in enumerate(["Hello world", "The quick brown"]))
    assert out == want


def test_generate_reads_a_prompts_file_applies_the_chat_template_and_writes_jsonl(ranks, tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompts.write_text('"plain string"\n\n{"prompt": "an object"}\n' + json.dumps({"messages": messages}) + "\n")
    output = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(tiny), "--prompt", "first", "--prompts-file", str(prompts), "--chat",
            "--max-new-tokens", str(NEW), "--dtype", "float64", "--output", str(output)]
    ((code, out, err),) = ranks(1).run(_main, argv)
    assert code == 0, err
    assert out == f"wrote 4 completions to {output}\n"
    tok = AutoTokenizer.from_pretrained(tiny)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    conversations = [[{"role": "user", "content": p}] for p in ("first", "plain string", "an object")] + [messages]
    assert [r["prompt"] for r in rows] == ["first", "plain string", "an object", messages]
    for row, conversation in zip(rows, conversations):
        ids = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert row["prompt_ids"] == list(ids)
        assert row["token_ids"] == hf_greedy(tiny, row["prompt_ids"], NEW)
        assert row["completion"] == tok.decode(row["token_ids"], skip_special_tokens=True)


def _torchrun(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "shiftlib", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **env})


def test_generate_under_torchrun_on_two_ranks_with_the_embedded_tiny_model(tmp_path):
    """Both ranks write the tiny checkpoint at once (no process group yet), then prefill in SP mode (threshold
    4) and decode in TP mode; rank 0 alone reports."""
    home, output = tmp_path / "home", tmp_path / "out.jsonl"
    run = _torchrun(["generate", "--model", "tiny", "--tp", "1", "--sp", "2", "--threshold", "4", "--prompt",
                     "Hello world", "--prompt", "Shift parallelism", "--max-new-tokens", str(NEW), "--dtype", "float64",
                     "--output", str(output)], {"SHIFTLIB_HOME": str(home)})
    assert run.returncode == 0, run.stderr
    # Rank 0 alone reports; a library may add lines of its own, so look for ours among them.
    assert run.stdout.count("wrote") == 1 and f"wrote 2 completions to {output}\n" in run.stdout, run.stdout
    (path,) = home.iterdir()  # one checkpoint, no temporary directory left
    tok = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    for row, prompt in zip(rows, ["Hello world", "Shift parallelism"], strict=True):
        assert row["prompt"] == prompt and row["prompt_ids"] == tok.encode(prompt)
        assert row["token_ids"] == hf_greedy(path, row["prompt_ids"], NEW)


def test_a_bad_shard_under_torchrun_stops_every_rank_with_one_line(tiny, tmp_path):
    bad = broken_copy(tiny, tmp_path / "bad", "truncated shard")
    run = _torchrun(["generate", "--model", str(bad), "--tp", "2", "--prompt", "hi"], {})
    assert run.returncode != 0
    ours = [line for line in run.stderr.splitlines() if line.startswith("shiftlib: error:")]
    assert len(ours) == 1 and "corrupt or truncated checkpoint shard" in ours[0], run.stderr
    assert len(re.findall(r"exitcode\s+: 2", run.stderr)) == 2, run.stderr  # both ranks, from torchrun's report
    assert "shiftlib/" not in "".join(line for line in run.stderr.splitlines() if line.strip().startswith("File "))


# -- info --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp, sp", [(2, 2), (1, 8), (4, 1)])
def test_info_prints_the_mesh_head_map_and_memory_per_rank(ranks, tiny, tp, sp):
    ((code, out, err),) = ranks(1).run(_main, ["info", "--model", str(tiny), "--tp", str(tp), "--sp", str(sp)])
    assert code == 0, err
    config = AutoConfig.from_pretrained(tiny)
    P = tp * sp
    heads = HeadMap(config.num_attention_heads, config.num_key_value_heads, config.head_dim, P)
    assert f"tp={tp} x sp={sp} = {P} ranks" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s*\d+\s+\(\d+,\d+\)", line)]
    assert len(rows) == P

    def span(r):
        return f"{r.start}" if len(r) == 1 else f"{r.start}-{r.stop - 1}"

    params = _bytes(parameter_bytes_per_rank(config, tp, sp, torch.float32))
    for rank, row in enumerate(rows):
        t, s = divmod(rank, sp)
        shard = range(t * sp, (t + 1) * sp)
        sp_kv = sorted({k for c in shard for k in heads.kv_heads(c)})
        assert row[:7] == [str(rank), f"({t},{s})", str(rank), span(heads.q_heads(rank)), span(heads.kv_heads(rank)),
                           span(range(heads.q_heads(shard.start).start, heads.q_heads(shard.stop - 1).stop)),
                           span(range(sp_kv[0], sp_kv[-1] + 1))]
        assert " ".join(row[7:]) == params
    block = PagedKVCache.bytes_per_block(config.num_hidden_layers, 16, heads.kv_per_chunk, config.head_dim,
                                         torch.float32)
    assert f"parameters {params}; KV cache {_bytes(block)} per block of 16 tokens" in out


# -- mistakes ----------------------------------------------------------------------------------------------


def _assert_one_line(result: tuple[int, str, str], pattern: str) -> None:
    code, out, err = result
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("shiftlib: error: "), err
    assert "Traceback" not in err and re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_is_one_line_and_exit_code_2(ranks, tiny, tmp_path, case):
    path = broken_copy(tiny, tmp_path / "model", case)
    (result,) = ranks(1).run(_main, ["generate", "--model", str(path), "--prompt", "hi"])
    _assert_one_line(result, BAD_CHECKPOINTS[case][2])


def _without(*names: str):
    return lambda p: [(p / n).unlink() for n in names]


BAD_COMMANDS = {
    "unknown option": ([], "--temprature 0.5", "unrecognized arguments: --temprature"),
    "unknown dtype": ([], "--dtype float8", "unknown dtype 'float8'"),
    "mesh larger than the world": ([], "--tp 2 --sp 1", "does not match the world size 1"),
    "no prompts": ([], "", "no prompts: pass --prompt"),
    "missing prompts file": ([], "--prompts-file /nonexistent.jsonl", "cannot read --prompts-file /nonexistent.jsonl"),
    "negative max-new-tokens": ([], "--max-new-tokens -1", "argument --max-new-tokens: must be >= 0, got -1"),
    "no tokenizer": ([_without("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")], "",
                     "has no tokenizer"),
    "chat without a template": ([_without("chat_template.jinja")], "--chat", "has no chat template"),
    "cuda without a GPU": ([], "--device cuda", "torch sees no CUDA device"),
    "bad sampling value": ([], "--temperature -1", "argument --temperature: must be >= 0.0, got -1"),
    "bad top-p": ([], "--top-p 1.5", "top_p must be in \\(0, 1\\], got 1.5"),
    "prompt longer than the context": ([], "--max-new-tokens 100000", "prompt 0 \\(3 tokens\\) \\+ --max-new-tokens 100000 exceeds "
                                       "the model's context"),
    "prompt longer than the cache": ([], "--num-blocks 1 --block-size 4", "prompt 0 \\(3 tokens\\) \\+ --max-new-tokens 32 exceeds "
                                     "the KV cache of 4 tokens: raise --num-blocks"),
}


@pytest.mark.parametrize("case", sorted(BAD_COMMANDS))
def test_a_bad_command_is_one_line_and_exit_code_2(ranks, tiny, tmp_path, case):
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    edits, extra, pattern = BAD_COMMANDS[case]
    path = tmp_path / "model"
    shutil.copytree(tiny, path)
    for edit in edits:
        edit(path)
    prompts = [] if case in ("no prompts", "missing prompts file") else ["--prompt", "hi"]
    (result,) = ranks(1).run(_main, ["generate", "--model", str(path), *prompts, *extra.split()])
    _assert_one_line(result, pattern)


def test_a_bad_prompts_file_names_the_line(ranks, tiny, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"ok"\n{"prompt": \n')
    (result,) = ranks(1).run(_main, ["generate", "--model", str(tiny), "--prompts-file", str(prompts)])
    _assert_one_line(result, r"p\.jsonl line 2 is not valid JSON")
    prompts.write_text('{"text": "no prompt key"}\n')
    (result,) = ranks(1).run(_main, ["generate", "--model", str(tiny), "--prompts-file", str(prompts)])
    _assert_one_line(result, r"line 1: expected a string")


def test_info_with_a_mesh_that_does_not_divide_the_heads_is_one_line(ranks, tiny):
    (result,) = ranks(1).run(_main, ["info", "--model", str(tiny), "--tp", "3"])
    _assert_one_line(result, "num_attention_heads=8 is not divisible by tp\\*sp=3")


def test_a_missing_model_from_a_fresh_process_is_one_line_and_exit_code_2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "shiftlib", "info", "--model", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"shiftlib: error: model directory {tmp_path / 'nope'} does not exist: pass a local Hugging " \
                         f"Face model directory (config.json + safetensors weights)\n"
