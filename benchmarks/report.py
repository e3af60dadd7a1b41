"""From the ranks' raw timings to the report: medians, ratios against the baseline, targets.

Pure functions over plain data, so that the arithmetic is tested without launching anything.
A *job* is one launch of one variant: `{"variant": name, "repeat": r, "ranks": [rank record, ...]}`
where a rank record is what `benchmarks.worker` writes.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.variants import BASELINE, TARGETS, VARIANTS, Target

__all__ = ["summarize", "to_markdown"]


def _job_model(job: Mapping[str, Any], model: str) -> list[Mapping[str, Any]]:
    """Each rank's record for `model` in one job, in rank order."""
    ranks = sorted(job["ranks"], key=lambda r: r["rank"])
    return [next(m for m in r["models"] if m["model"] == model) for r in ranks]


def _row(variant: str, model: str, jobs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    per_job = [_job_model(job, model) for job in jobs]
    # Steps are synchronous, so the ranks' times agree; the slowest rank is the job's step time.
    step_ms = [1000 * max(r["step_s"] for r in ranks) for ranks in per_job]
    cpu_ms = [1000 * statistics.mean(r["cpu_step_s"] for r in ranks) for ranks in per_job]
    first_step_s = [max(r["first_step_s"] for r in ranks) for ranks in per_job]
    rss = [[r["peak_rss_mb"] for r in ranks] for ranks in per_job]
    return {
        "variant": variant,
        "model": model,
        "ranks": len(per_job[0]),
        "params": per_job[0][0]["params"],
        "steps": per_job[0][0]["steps"],
        "repeats": len(jobs),
        "step_ms": statistics.median(step_ms),
        "step_ms_min": min(step_ms),
        "step_ms_max": max(step_ms),
        "step_ms_samples": step_ms,
        "cpu_ms": statistics.median(cpu_ms),
        "first_step_s": statistics.median(first_step_s),
        "peak_rss_mb_per_rank": [statistics.median(column) for column in zip(*rss)],
    }


def _target(target: Target, ratios: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    by_model = dict(ratios.get(target.variant, {}))
    if target.versus is not None:  # t(versus) / t(variant), from both variants' ratios to the baseline.
        versus = ratios.get(target.versus, {})
        by_model = {model: versus[model] / ratio for model, ratio in by_model.items() if model in versus and ratio}
    measured = by_model.get(target.model)
    return {
        "goal": target.goal,
        "variant": target.variant,
        "model": target.model,
        "at_least": target.at_least,
        "measured": measured,
        "met": None if measured is None else measured >= target.at_least,
        "by_model": dict(by_model),
    }


def summarize(jobs: Sequence[Mapping[str, Any]], models: Sequence[str]) -> dict[str, Any]:
    """Medians per (variant, model), each variant's ratio to the baseline, and the targets.

    `ratio` is the variant's median step time divided by the baseline's median on the same model:
    above 1 the variant is slower than hvdclip. It is `None` when the baseline did not run.
    """
    by_variant: dict[str, list[Mapping[str, Any]]] = {}
    for job in jobs:
        by_variant.setdefault(job["variant"], []).append(job)
    variants = [name for name in VARIANTS if name in by_variant]
    rows = [_row(v, m, by_variant[v]) for v in variants for m in models]
    baseline = {row["model"]: row["step_ms"] for row in rows if row["variant"] == BASELINE}
    ratios: dict[str, dict[str, float]] = {}
    cpu_baseline = {row["model"]: row["cpu_ms"] for row in rows if row["variant"] == BASELINE}
    for row in rows:
        base = baseline.get(row["model"])
        row["ratio"] = None if base is None else row["step_ms"] / base
        row["cpu_ratio"] = None if base is None else row["cpu_ms"] / cpu_baseline[row["model"]]
        if row["ratio"] is not None:
            ratios.setdefault(row["variant"], {})[row["model"]] = row["ratio"]
    ready = {v: statistics.median(max(r["launch_to_ready_s"] for r in job["ranks"]) for job in by_variant[v]) for v in variants}
    targets = [
        _target(t, ratios)
        for t in TARGETS
        if t.variant in by_variant and BASELINE in by_variant and (t.versus is None or t.versus in by_variant)
    ]
    return {"variants": variants, "models": list(models), "rows": rows, "launch_to_ready_s": ready, "targets": targets}


def _fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(cells) + " |" for cells in lines]


def to_markdown(summary: Mapping[str, Any], context: Mapping[str, Any]) -> str:
    """The report as Markdown: step times with ratios, targets, start-up and memory, and the set-up."""
    models, variants = summary["models"], summary["variants"]
    rows = {(row["variant"], row["model"]): row for row in summary["rows"]}
    label = {name: VARIANTS[name].label for name in variants}

    step_lines = []
    for v in variants:
        cells = [label[v], str(rows[v, models[0]]["ranks"])]
        for m in models:
            row = rows[v, m]
            cells += [f"{row['step_ms']:.2f} ({row['step_ms_min']:.2f}–{row['step_ms_max']:.2f})", _fmt_ratio(row["ratio"])]
        step_lines.append(cells)
    step_header = ["variant", "ranks"] + [c for m in models for c in (f"{m}: ms/step (min–max)", "÷ hvdclip")]

    cpu_lines = []
    for v in variants:
        cells = [label[v]]
        for m in models:
            cells += [f"{rows[v, m]['cpu_ms']:.2f}", _fmt_ratio(rows[v, m]["cpu_ratio"])]
        cpu_lines.append(cells)
    cpu_header = ["variant"] + [c for m in models for c in (f"{m}: CPU ms/step", "÷ hvdclip")]

    target_lines = []
    for t in summary["targets"]:
        met = {None: "–", True: "met", False: "**missed**"}[t["met"]]
        others = ", ".join(f"{m} {_fmt_ratio(r)}" for m, r in t["by_model"].items() if m != t["model"])
        target_lines.append([t["goal"], f"≥ {t['at_least']:.2f}", f"{_fmt_ratio(t['measured'])} ({t['model']})", met, others or "–"])

    start_lines = []
    for v in variants:
        cells = [label[v], f"{summary['launch_to_ready_s'][v]:.1f}"]
        cells += [f"{rows[v, m]['first_step_s']:.2f}" for m in models]
        cells += [" / ".join(f"{mb:.0f}" for mb in rows[v, m]["peak_rss_mb_per_rank"]) for m in models]
        start_lines.append(cells)
    start_header = ["variant", "launch → ready, s"] + [f"{m}: first step, s" for m in models]
    start_header += [f"{m}: peak RSS per rank, MB" for m in models]

    setup = [f"- {key}: {value}" for key, value in context.items()]
    parts = [
        "Median step time over the repeats (min–max in brackets); `÷ hvdclip` is the variant's median "
        "divided by hvdclip's on the same model, so above 1.00× the variant is slower than hvdclip.",
        "",
        *_table(step_header, step_lines),
        "",
        "CPU time per step and rank (all threads of the process, mean over ranks, median over repeats): "
        "less sensitive than wall time to other work on the machine, but it counts busy waiting too.",
        "",
        *_table(cpu_header, cpu_lines),
        "",
        "Targets (issue 7): each is a lower bound on the `÷ hvdclip` ratio of the variant named.",
        "",
        *_table(["target", "goal", "measured", "", "other models"], target_lines),
        "",
        "Start-up and memory: *launch → ready* is launcher start to TensorFlow and Horovod initialised; "
        "*first step* is model construction to the end of the first step (build, start-up broadcast, "
        "tracing); peak RSS is per rank, measured while that model trained (medians over the repeats).",
        "",
        *_table(start_header, start_lines),
        "",
        "Set-up:",
        "",
        *setup,
    ]
    return "\n".join(parts) + "\n"
