"""Records to a table: the terminal summary at the end of a run and the Markdown in ``docs/benchmarks.md``."""

from __future__ import annotations

COLUMNS = (
    ("config", "config"),
    ("mesh", "mesh"),
    ("load", "load"),
    ("ttft_ms_p50", "TTFT p50 ms"),
    ("ttft_ms_p99", "TTFT p99 ms"),
    ("tpot_ms_p50", "TPOT p50 ms"),
    ("tpot_ms_p99", "TPOT p99 ms"),
    ("latency_ms_p50", "latency p50 ms"),
    ("output_tok_per_s", "output tok/s"),
    ("total_tok_per_s", "total tok/s"),
    ("steps_per_mode", "steps tp/sp"),
)


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "steps_per_mode":
        return (
            f"{value.get('tp', 0)}/{value.get('sp', 0)}"
            if set(value) <= {"tp", "sp"}
            else ",".join(f"{k}:{v}" for k, v in value.items())
        )
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value)


def table(records: list[dict], markdown: bool = False) -> str:
    """One row per record, in the run's order."""
    head = [title for _, title in COLUMNS]
    rows = [[_cell(key, rec.get(key)) for key, _ in COLUMNS] for rec in records]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [head, *rows])
