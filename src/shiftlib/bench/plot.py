"""Plots of benchmark records: ``python -m shiftlib.bench.plot FILE.json --out DIR``.

* ``latency_throughput.png`` -- TPOT and TTFT (p50) against output throughput, one curve per configuration over
  the concurrency levels (solid) and the Poisson rates (dashed): down and to the right is better.
* ``ttft_tpot_bars.png`` -- TTFT and TPOT p50 per concurrency level, a bar per configuration.
* ``bursty_modes.png`` -- every step of the bursty trace: its size in tokens over time, coloured by the mode it
  ran in, with the switch threshold; what shift does when load comes and goes.
* ``long_prompt_ttft.png`` -- time to first token against prompt length.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

MODE_COLORS = {"tp": "tab:blue", "sp": "tab:orange", "hf": "tab:gray"}


def _series_name(rec: dict) -> str:
    return rec["config"] if rec["config"] in ("dp", "hf") or rec["mesh"] == "1x1" else f"{rec['config']} {rec['mesh']}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(records: list[dict], what: str) -> str:
    r = records[0]
    m = r.get("machine", {})
    return f"{what} -- {r.get('preset')} {r.get('dtype')}, {m.get('ranks')} x {m.get('device')}"


def _save(plt, fig, path: Path, title: str, fontsize: float | None = None) -> Path:
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_throughput(records: list[dict], path: Path) -> Path | None:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for rec in records:
        if rec["workload"] in ("concurrency", "poisson"):
            groups[(_series_name(rec), rec["workload"])].append(rec)
    if not groups:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = {}
    for (name, workload), recs in sorted(groups.items()):
        key = (lambda r: r["concurrency"]) if workload == "concurrency" else (lambda r: r["rate"])
        recs = sorted(recs, key=key)
        color = colors.setdefault(name, f"C{len(colors)}")
        style = "-o" if workload == "concurrency" else "--s"
        label = name if workload == "concurrency" else f"{name} (Poisson)"
        for ax, metric in zip(axes, ("tpot_ms_p50", "ttft_ms_p50")):
            pts = [(r["output_tok_per_s"], r[metric], r) for r in recs if r[metric] is not None]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=label, ms=4)
            for x, y, r in pts:
                tag = f"c{r['concurrency']}" if workload == "concurrency" else f"{r['rate']:g}/s"
                ax.annotate(tag, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3), color=color)
    for ax, name in zip(axes, ("TPOT p50 (ms)", "TTFT p50 (ms)")):
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    return _save(plt, fig, path, _title(records, "latency vs throughput"))


def ttft_tpot_bars(records: list[dict], path: Path) -> Path | None:
    recs = [r for r in records if r["workload"] == "concurrency"]
    if not recs:
        return None
    plt = _pyplot()
    levels = sorted({r["concurrency"] for r in recs})
    names = list(dict.fromkeys(_series_name(r) for r in recs))
    width = 0.8 / len(names)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, metric, title in zip(axes, ("ttft_ms_p50", "tpot_ms_p50"), ("TTFT p50 (ms)", "TPOT p50 (ms)")):
        for i, name in enumerate(names):
            by_level = {r["concurrency"]: r[metric] for r in recs if _series_name(r) == name}
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(levels))]
            ax.bar(xs, [by_level.get(c) or 0 for c in levels], width, label=name, color=f"C{i}")
        ax.set_xticks(range(len(levels)), [f"c={c}" for c in levels])
        ax.set_ylabel(title)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y", which="both")
    axes[0].legend(fontsize=8)
    return _save(plt, fig, path, _title(records, "TTFT and TPOT by concurrency"))


def bursty_modes(records: list[dict], path: Path) -> Path | None:
    recs = [r for r in records if r["workload"] == "bursty" and r.get("step_trace")]
    if not recs:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(recs), 1, figsize=(13, 2.6 * len(recs) + 0.6), sharex=True, squeeze=False)
    for ax, rec in zip(axes[:, 0], recs):
        trace = rec["step_trace"]
        for mode in sorted({s[1] for s in trace}):
            pts = [s for s in trace if s[1] == mode]
            ax.scatter(
                [s[0] for s in pts], [s[2] for s in pts], s=6, color=MODE_COLORS.get(mode, "k"), label=f"{mode} step"
            )
        if rec["config"] == "shift":
            ax.axhline(rec["threshold"], color="k", lw=0.8, ls="--", label=f"threshold {rec['threshold']}")
        for b in rec.get("bursts_s", []):
            ax.axvspan(b, b + rec["burst_s"], color="tab:red", alpha=0.07)
        arrivals = rec.get("arrivals_s", [])
        ax.plot(arrivals, [0.8] * len(arrivals), "|", color="tab:red", ms=6, label="arrivals")
        ax.set_yscale("log")
        ax.set_ylabel("tokens per step")
        counts = ", ".join(f"{k} {v}" for k, v in rec["steps_per_mode"].items())
        ax.set_title(
            f"{_series_name(rec)}: {counts} steps; TTFT p50 {rec['ttft_ms_p50']:.1f} ms, "
            f"TPOT p50 {rec['tpot_ms_p50'] or 0:.2f} ms",
            fontsize=9,
        )
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("time (s, idle stretches skipped)")
    return _save(plt, fig, path, _title(records, "mode of every step over the bursty trace"))


def long_prompt_ttft(records: list[dict], path: Path) -> Path | None:
    recs = [r for r in records if r["workload"] == "long-prompt"]
    if not recs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(dict.fromkeys(_series_name(r) for r in recs))
    for i, name in enumerate(names):
        pts = sorted((r["prompt_len"], r["ttft_ms_p50"]) for r in recs if _series_name(r) == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=f"C{i}", label=name, ms=4)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(plt, fig, path, _title(records, "time to first token"), fontsize=10)


def plot_all(records: list[dict], out: Path) -> list[Path]:
    """Every plot the records allow, as PNGs in ``out``; returns the paths written."""
    if not records:
        raise ValueError("no records to plot: the JSON holds an empty list")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    makers = (latency_throughput, ttft_tpot_bars, bursty_modes, long_prompt_ttft)
    written = [fn(records, out / f"{fn.__name__}.png") for fn in makers]
    return [p for p in written if p is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shiftlib.bench.plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("records", type=Path, help="JSON written by shiftlib bench --output")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    args = parser.parse_args(argv)
    for path in plot_all(json.loads(args.records.read_text()), args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
