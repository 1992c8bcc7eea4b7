"""``shiftlib bench`` and its cost model on CPU ranks: the records, the plots, and ranks that agree on a schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from shiftlib.bench import costmodel
from shiftlib.bench.metrics import RequestRecord, percentile, summarize
from shiftlib.bench.suite import Bench, BenchOptions
from shiftlib.bench.workloads import bursty, concurrency_sweep, long_prompts, poisson

REQUIRED = ("config", "concurrency", "ttft_ms_p50", "tpot_ms_p50", "output_tok_per_s", "machine", "versions", "command")
PLOTS = ("latency_throughput.png", "ttft_tpot_bars.png", "bursty_modes.png", "long_prompt_ttft.png")
# Small enough for seconds on CPU ranks; every workload kind once.
TINY = [
    "--preset",
    "tiny",
    "--concurrency",
    "1,3",
    "--input-len",
    "12",
    "--output-len",
    "4",
    "--waves",
    "1",
    "--rates",
    "400",
    "--num-requests",
    "4",
    "--trace",
    "bursty",
    "--trace-seconds",
    "0.3",
    "--quiet-rate",
    "20",
    "--burst-rate",
    "200",
    "--long-prompts",
    "40",
    "--long-output-len",
    "2",
    "--threshold",
    "12",
    "--no-progress",
]


def _bench(argv: list[str]) -> int:
    from shiftlib.bench.cli import main

    return main(argv)


def _check_records(records: list[dict], configs: set[str], meshes: set[str] | None = None) -> None:
    assert {r["config"] for r in records} == configs
    if any(r["workload"] == "bursty" for r in records):  # shift switched mode over the trace
        assert any(r["config"] == "shift" and r["workload"] == "bursty" for r in records)
    for r in records:
        for key in REQUIRED:
            assert key in r, (key, r["config"], r["load"])
        assert r["output_tok_per_s"] > 0 and r["ttft_ms_p50"] > 0
        if r["workload"] != "bursty":  # every request produced exactly its tokens (the trace's lengths vary)
            assert r["output_tokens"] == r["num_requests"] * r["output_len"]
        assert r["versions"]["torch"] and r["machine"]["ranks"] >= 1
        if r["config"] != "hf":
            assert sum(r["steps_per_mode"].values()) == r["num_steps"] > 0
    engine_loads = {(r["config"], r["mesh"], r["load"]) for r in records if r["config"] in ("shift", "tp", "sp")}
    if meshes is not None:
        assert {m for _, m, _ in engine_loads} == meshes
    # The modes that ran are the configuration's: tp only, sp only, or both for shift over the bursty trace.
    for r in records:
        if r["config"] in ("tp", "sp"):
            assert set(r["steps_per_mode"]) == {r["config"]}
    shift_bursty = [r for r in records if r["config"] == "shift" and r["workload"] == "bursty"]
    assert all(r["step_trace"] and {s[1] for s in r["step_trace"]} == {"tp", "sp"} for r in shift_bursty)
    # No Hugging Face record for open-loop loads: generate has no continuous batching.
    assert all(r["workload"] in ("concurrency", "long-prompt") for r in records if r["config"] == "hf")


def test_bench_on_one_rank_writes_json_and_plots(ranks, tmp_path: Path) -> None:
    out, plots = tmp_path / "bench.json", tmp_path / "plots"
    assert ranks(1).run(_bench, TINY + ["--output", str(out), "--plots", str(plots)]) == [0]
    records = json.loads(out.read_text())
    _check_records(records, {"shift", "tp", "sp", "dp", "hf"}, {"1x1"})
    loads = {r["load"] for r in records if r["config"] == "shift"}
    assert loads == {"c=1", "c=3", "rate=400/s", "bursty", "prompt=40"}
    for name in PLOTS:
        assert (plots / name).stat().st_size > 10_000, name
    assert records[0]["command"].startswith("python -m shiftlib bench --preset tiny")


def test_bench_on_two_ranks_runs_every_configuration_on_both_meshes(ranks, tmp_path: Path) -> None:
    out = tmp_path / "bench2.json"
    argv = TINY + ["--meshes", "1x2,2x1", "--output", str(out), "--plots", str(tmp_path / "plots")]
    assert ranks(2).run(_bench, argv) == [0, 0]
    records = json.loads(out.read_text())
    _check_records(records, {"shift", "tp", "sp", "dp", "hf"}, {"1x2", "2x1"})
    assert all(r["world"] == 2 and r["machine"]["ranks"] == 2 for r in records)
    dp = [r for r in records if r["config"] == "dp" and r["load"] == "c=3"]
    assert dp and dp[0]["num_requests"] == 3  # both replicas' requests, added up
    hf = [r for r in records if r["config"] == "hf"]
    assert all("tp_plan" in r["note"] or "failed" in r["note"] for r in hf)


def test_bench_on_four_ranks_runs_the_p4_meshes_shift_and_dp(ranks, tmp_path: Path) -> None:
    out = tmp_path / "bench4.json"
    argv = [
        "--preset",
        "tiny",
        "--meshes",
        "4x1,2x2,1x4",
        "--configs",
        "shift,sp,dp",
        "--concurrency",
        "2",
        "--input-len",
        "8",
        "--output-len",
        "3",
        "--waves",
        "1",
        "--no-progress",
        "--output",
        str(out),
    ]
    assert ranks(4).run(_bench, argv) == [0] * 4
    records = json.loads(out.read_text())
    _check_records(records, {"shift", "sp", "dp"}, {"4x1", "2x2", "1x4"})
    assert len(records) == 3 * 2 + 1


def _drive_open_loop(skew_s: float) -> list[tuple[str, int, int]]:
    """Drive one engine over a Poisson load with this rank's clock skewed; return the steps it ran."""
    import torch.distributed as dist

    import shiftlib
    from shiftlib.bench.driver import Clock, drive
    from shiftlib.presets import preset_config, random_model

    class Skewed(Clock):
        def local(self) -> float:
            return super().local() + skew_s * dist.get_rank()

    mesh = shiftlib.init_mesh(1, dist.get_world_size(), "cpu")
    engine = shiftlib.Engine(
        shiftlib.parallelize(random_model(preset_config("tiny")), mesh, threshold=20), num_blocks=128
    )
    load = poisson([300.0], 10, 16, 3, 256, seed=1)[0]
    _, steps = drive(engine, load, Skewed(dist.group.WORLD))
    return [(s.mode, s.num_tokens, s.num_seqs) for s in steps]


def test_open_loop_ranks_admit_the_same_requests_at_the_same_steps_despite_skewed_clocks(ranks) -> None:
    per_rank = ranks(2).run(_drive_open_loop, 0.25)
    assert per_rank[0] == per_rank[1]
    assert {m for m, _, _ in per_rank[0]} == {"tp", "sp"}  # prefills of several arrivals cross the threshold


# -- workloads, metrics, DP shares ------------------------------------------------------------------------------


def test_workloads_are_the_same_for_the_same_seed_and_differ_for_another() -> None:
    a = concurrency_sweep([2], 5, 3, 100, waves=2, seed=7)[0]
    assert a.requests == concurrency_sweep([2], 5, 3, 100, waves=2, seed=7)[0].requests
    assert a.requests != concurrency_sweep([2], 5, 3, 100, waves=2, seed=8)[0].requests
    assert len(a.requests) == 4 and a.concurrency == 2
    p = poisson([10.0], 200, 4, 2, 100)[0]
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(p.requests, p.requests[1:])]
    assert 0.07 < sum(gaps) / len(gaps) < 0.13  # mean gap 1/rate
    assert long_prompts([64], 2, 100)[0].requests[0].prompt.__len__() == 64


def test_bursty_trace_is_denser_inside_bursts() -> None:
    load = bursty(60.0, 8, 4, 100, quiet_rate=1.0, burst_rate=40.0, bursts=12, seed=3)
    bursts, width = load.params["bursts_s"], load.params["burst_s"]
    assert len(bursts) == 12 and math.isclose(width, 1.0)
    inside = sum(any(b <= r.arrival_s < b + width for b in bursts) for r in load.requests)
    outside = len(load.requests) - inside
    assert inside / len(bursts) > 10 * outside / (60.0 - len(bursts))
    assert len({len(r.prompt) for r in load.requests}) > 3  # lengths vary


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="nothing to measure"):
        BenchOptions(concurrency=[]).validate()
    with pytest.raises(ValueError, match="unknown configurations"):
        BenchOptions(configs=["shift", "vllm"]).validate()
    with pytest.raises(ValueError, match="concurrency levels must be >= 1"):
        concurrency_sweep([0], 4, 4, 10)
    with pytest.raises(ValueError, match="Poisson rates must be > 0"):
        poisson([0.0], 4, 4, 4, 10)


def test_dp_shares_split_clients_and_requests_exactly_once() -> None:
    bench = Bench.__new__(Bench)
    for world, c in ((2, 3), (4, 2), (4, 9)):
        bench.world = world
        load = concurrency_sweep([c], 3, 2, 50, waves=2)[0]
        shares = [bench._share(load, r) for r in range(world)]
        assert [q for s in shares for q in s.requests] == load.requests
        assert sum(s.concurrency for s in shares if s.requests) == c
        open_load = poisson([5.0], 7, 3, 2, 50)[0]
        assert sorted(q.arrival_s for r in range(world) for q in bench._share(open_load, r).requests) == [
            q.arrival_s for q in open_load.requests
        ]


def test_metrics_percentiles_and_throughput() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5 and percentile([], 50) is None
    reqs = [RequestRecord(0.0, 10, 5, 0.1, 0.5), RequestRecord(0.2, 10, 5, 0.4, 1.0)]
    m = summarize(reqs, [], 1.0)
    assert m["output_tok_per_s"] == 10 and m["total_tok_per_s"] == 30
    assert math.isclose(m["tpot_ms_p50"], 125.0) and math.isclose(m["ttft_ms_p50"], 150.0)
    with pytest.raises(RuntimeError, match="did not finish"):
        summarize([RequestRecord(0.0, 3)], [], 1.0)


# -- cost model -----------------------------------------------------------------------------------------------


def _synthetic_measurement() -> dict:
    """Slice times of a memory-bound decode (weights / p, a fixed floor) and a compute-bound prefill (tokens / p)."""
    shape = dict(
        hidden=4096,
        heads=32,
        kv_heads=8,
        head_dim=128,
        intermediate=14336,
        vocab=128256,
        layers=32,
        tie_word_embeddings=False,
    )
    runs = []
    for layers in (16, 32):
        for p in (1, 2, 4, 8):
            per_layer_decode = {str(n): 0.02 + 0.10 / p + 0.0004 * n / p for n in (1, 16, 64, 256)}
            per_layer_prefill = {str(n): 0.02 + 0.10 / p + 0.0008 * n / p for n in (128, 1024, 4096)}
            per_layer_mixed = {
                str(b): {str(n): 0.02 + 0.10 / p + 0.0004 * b / p + 0.0008 * n / p for n in (128, 1024, 2048)}
                for b in (1, 64, 256)
            }
            runs.append(
                dict(
                    layers=layers,
                    p=p,
                    weights_bytes=0,
                    decode_ms={k: 1.0 + layers * v for k, v in per_layer_decode.items()},
                    prefill_ms={k: 1.0 + layers * v for k, v in per_layer_prefill.items()},
                    mixed_ms={b: {k: 1.0 + layers * v for k, v in t.items()} for b, t in per_layer_mixed.items()},
                    ttft_ms={"8192": 1.0 + layers * (0.02 + 8192 * 0.0009 / p)},
                )
            )
    return dict(kind="shiftlib-costmodel-measurement", preset="synthetic", shape=shape, max_num_tokens=4096, runs=runs)


def test_cost_model_splits_layers_and_predicts_a_switch_point(tmp_path: Path) -> None:
    model = costmodel.CostModel(_synthetic_measurement())
    assert math.isclose(model.compute(2, "decode", 16), 1.0 + 32 * (0.02 + 0.05 + 0.0004 * 8), rel_tol=1e-9)
    deeper = costmodel.CostModel(_synthetic_measurement(), layers=80)
    assert deeper.compute(1, "decode", 1) > 2 * model.compute(1, "decode", 1)
    # TP mode wins small steps (fewer weight bytes per rank, no all-to-all); SP mode large ones (less to reduce).
    assert model.step("tp", 8, 0, 1) < model.step("sp", 8, 0, 1, mesh=(1, 8))
    # A mixed step is priced between the measured decode batches, linear in the batch.
    mixed = [model.mixed(1, 1024, b) for b in (1, 32, 64)]
    assert mixed[0] < mixed[1] < mixed[2] and math.isclose(mixed[1], (31 * mixed[2] + 32 * mixed[0]) / 63)
    x = model.crossover(8, "decode", (1, 8))
    assert x is not None and 1 < x < 4096
    pred = costmodel.predict(model, "synthetic", [2, 8])
    for P in ("2", "8"):
        w = pred["by_world"][P]
        shift, tp = w["curves"]["shift"], w["curves"]["tp"]
        assert shift[0]["tpot_ms"] <= tp[0]["tpot_ms"] * 1.0001  # at c=1 shift runs TP
        assert shift[-1]["output_tok_per_s"] >= tp[-1]["output_tok_per_s"]
        assert set(w["ratios"]) >= {"tpot_c1_tp_over_shift", "throughput_cmax_shift_over_dp"}
    text = costmodel.markdown([pred])
    assert "predicted" in text and "| 512 |" in text
    assert all(p.stat().st_size > 10_000 for p in costmodel.plot([pred], tmp_path))


def test_a_layer_never_costs_less_for_more_tokens_when_the_host_bounds_the_shallow_run() -> None:
    meas = _synthetic_measurement()
    shallow = next(r for r in meas["runs"] if (r["layers"], r["p"]) == (16, 8))
    deep = next(r for r in meas["runs"] if (r["layers"], r["p"]) == (32, 8))
    shallow["decode_ms"]["256"] = deep["decode_ms"]["256"] + 1.0  # the 16-layer step waited on the host
    model = costmodel.CostModel(meas, layers=80)
    per_layer = dict(model.slices[8].per_layer["decode"])
    assert per_layer[256.0] == per_layer[64.0] > 0
    assert model.compute(8, "decode", 256) >= model.compute(8, "decode", 64)


def test_collective_times_follow_the_two_gpu_figures_and_scale_with_ring_bytes() -> None:
    comm = costmodel.Comm()
    assert math.isclose(comm.all_reduce(8192 * 4096 * 2, 2), 0.27)
    assert math.isclose(comm.all_to_all(32768 * 4096 * 2, 2), 0.53)
    assert comm.all_reduce(8192 * 4096 * 2, 8) > comm.all_reduce(8192 * 4096 * 2, 2)
    assert comm.all_reduce(10**9, 1) == 0.0


def test_slice_config_divides_heads_mlp_and_vocab_or_says_why() -> None:
    from shiftlib.presets import preset_config

    c = costmodel.slice_config(preset_config("llama-8b"), 8, layers=2)
    assert (
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
        c.vocab_size,
        c.head_dim,
        c.num_hidden_layers,
    ) == (4, 1, 1792, 16032, 128, 2)
    with pytest.raises(ValueError, match="cannot slice"):
        costmodel.slice_config(preset_config("tiny"), 3)


def test_cost_model_measures_the_slices_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    costmodel.main(
        [
            "measure",
            "--preset",
            "tiny",
            "--parts",
            "1,2",
            "--layers",
            "1,2",
            "--batches",
            "1,2",
            "--prefill",
            "8,16",
            "--context",
            "8",
            "--long-prompts",
            "24",
            "--decode-steps",
            "2",
            "--device",
            "cpu",
            "--output",
            str(out),
        ]
    )
    m = json.loads(out.read_text())
    assert {(r["layers"], r["p"]) for r in m["runs"]} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert all(set(r["decode_ms"]) == {"1", "2"} and set(r["prefill_ms"]) == {"8", "16"} for r in m["runs"])
    model = costmodel.CostModel(m, layers=4)
    assert all(set(r["mixed_ms"]) == {"1", "2"} and all(set(t) == {"8", "16"} for t in r["mixed_ms"].values())
               for r in m["runs"])  # fmt: skip
    assert model.step("tp", 2, 0, 2) > 0 and model.step("sp", 2, 16, 2, mesh=(1, 2)) > 0
    assert model.ttft("sp", 2, 24, (1, 2)) > 0
