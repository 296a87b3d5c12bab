"""The seed study's report: summary.md (self-contained), its one-row summary, the loss figure."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from irnet.reproduce._figures import color, grid_figure, save
from irnet.reproduce._runner import markdown_table

ROW_HEADER = (
    "label",
    "config",
    "--set",
    "seeds",
    "epochs",
    "failed",
    "reached",
    "final val loss: median [min, max]",
    "final val acc: median [min, max]",
    "iters/layer, last 10 %: median [max]",
    "unconverged solves: total [max/seed]",
    "minutes/seed",
)


def render(
    meta: dict, results: list[dict], criteria: Sequence[Any], figures: Sequence[Path], out: Path
) -> str:
    """summary.md: command, machine, time, what was switched off, criteria, seeds, figures."""
    header, row = table_row(meta, results, criteria)
    reached = (
        "\n".join(f"- {criterion_line(c, results)}" for c in criteria) or "- (no --criterion given)"
    )
    images = "\n".join(f"![{f.stem}]({f.relative_to(out)})" for f in figures)
    sets = ", ".join(f"`{s}`" for s in meta["sets"]) or "none"
    return (
        f"# Seed study: {meta['label']}\n\n`{meta['command']}`\n\n"
        f"Config `{meta['config']}`, overrides: {sets}. {meta['machine']}; "
        f"{meta['minutes']:.1f} minutes (finished {meta['finished']}).\n\n"
        f"Switched off (cost time only): {meta['switched_off']}.\n\n"
        f"{_stop_line(meta)}"
        f"{reached}\n\n{seed_table(results)}\n\n"
        f"One row for a table of studies (docs/seeds.md):\n\n{header}\n{row}\n\n{images}\n"
    )


def _stop_line(meta: dict) -> str:
    """What ``--stop-when`` did, if given (old runs' metadata lack the key)."""
    stop = meta.get("stop_when")
    return (
        f"Each fit ended at its first validation with {stop} (strict), else at its last epoch; "
        "final values are those at the stop.\n\n"
        if stop
        else ""
    )


def criterion_line(criterion: Any, results: list[dict]) -> str:
    """``k of n seeds reach <criterion>`` and which."""
    met = [r["seed"] for r in results if criterion.met(r)]
    which = f" (seeds {', '.join(map(str, met))})" if met else ""
    return f"{len(met)} of {len(results)} seeds reach {criterion.text}{which}"


def seed_table(results: list[dict]) -> str:
    """One row per seed (accuracy columns only where some seed has an accuracy)."""
    accuracy = any(_finite(r.get("final_val_acc")) for r in results)
    header = [
        "seed",
        "final val loss",
        "best val loss (epoch)",
        *(["final val acc", "best val acc"] * accuracy),
        "final train loss",
        "epochs",
        "iters/layer",
        "iters/layer, last 10 %",
        "unconverged",
        "diverged",
        "val unconverged",
        "minutes",
        "status",
    ]
    rows = []
    for r in results:
        best = f"{num(r['best_val_loss'])} ({r['best_epoch']})" if r["best_epoch"] else "–"
        acc = [num(r["final_val_acc"]), num(r["best_val_acc"])] if accuracy else []
        status = (
            f"failed: {r['error']}".replace("|", "/").replace("\n", " ") if r["failed"] else "ok"
        )
        rows.append(
            [
                r["seed"],
                num(r["final_val_loss"]),
                best,
                *acc,
                num(r["final_train_loss"]),
                f"{r['epochs_run']}/{r['max_epochs']}",
                num(r["iterations_mean"], 3),
                num(r["iterations_last10"], 3),
                r["unconverged"],
                r["diverged"],
                r["val_unconverged"],
                f"{r['seconds'] / 60:.1f}",
                status,
            ]
        )
    return markdown_table(header, rows)


def table_row(meta: dict, results: list[dict], criteria: Sequence[Any]) -> tuple[str, str]:
    """(header with separator line, row): the whole run in one markdown row."""
    n = len(results)
    reached = "; ".join(f"{c.text}: {sum(c.met(r) for r in results)}/{n}" for c in criteria) or "–"
    late = [r["iterations_last10"] for r in results]
    unconverged = [r["unconverged"] for r in results]
    epochs = sorted({str(r["max_epochs"]) for r in results})
    row = [
        meta["label"],
        f"`{meta['config']}`",
        " ".join(f"`{s}`" for s in meta["sets"]) or "–",
        n,
        "/".join(epochs),
        sum(r["failed"] for r in results),
        reached,
        spread([r["final_val_loss"] for r in results]),
        spread([r["final_val_acc"] for r in results]),
        f"{num(_median(late), 3)} [{num(_max(late), 3)}]",
        f"{sum(unconverged)} [{max(unconverged, default=0)}]",
        f"{np.mean([r['seconds'] for r in results]) / 60:.1f}",
    ]
    table = markdown_table(ROW_HEADER, [row]).splitlines()
    return "\n".join(table[:2]), table[2]


def spread(values: Sequence[Optional[float]]) -> str:
    """``median [min, max]`` of the finite values, '–' if none; ``(k non-finite)`` appended."""
    finite = [v for v in values if _finite(v)]
    if not finite:
        return "–"
    missing = len(values) - len(finite)
    extra = f" ({missing} non-finite)" if missing else ""
    return f"{num(_median(finite))} [{num(min(finite))}, {num(max(finite))}]{extra}"


def figure(results: list[dict], criteria: Sequence[Any], path: Path, title: str = "") -> Path:
    """Validation loss per epoch of every seed (log scale; a failed seed dashed, × at its end),
    beside validation accuracy for classification; criteria on those metrics as grey lines."""
    accuracy = any(_finite(r.get("final_val_acc")) for r in results)
    fig, axes = grid_figure(1, 1 + accuracy, width=5, height=3.6)
    panels = [(axes[0, 0], "val_loss", "validation loss", "log")]
    if accuracy:
        panels.append((axes[0, 1], "val_acc", "validation accuracy", "linear"))
    for ax, key, label, scale in panels:
        for i, r in enumerate(results):
            values = np.asarray(r["history"][key], dtype=float)
            epochs = np.arange(1, len(values) + 1)
            style = "--" if r["failed"] else "-"
            ax.plot(epochs, values, style, color=color(i), lw=1.1, label=f"seed {r['seed']}")
            if r["failed"] and len(values):
                ax.plot(epochs[-1:], values[-1:], "x", color=color(i), ms=7)
        for c in criteria:
            if c.key.endswith(key):
                ax.axhline(c.threshold, color="0.5", lw=0.8, ls=":")
        ax.set(xlabel="epoch", ylabel=label, yscale=scale if _positive(results, key) else "linear")
    axes[0, 0].legend(fontsize="x-small", ncol=2)
    axes[0, 0].set_title(title, fontsize="small")
    return save(fig, path)


def num(value: Any, digits: int = 4) -> str:
    """``value`` to ``digits`` significant digits; '–' when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}g}"


def _positive(results: list[dict], key: str) -> bool:
    values = [v for r in results for v in r["history"][key] if _finite(v)]
    return bool(values) and min(values) > 0


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if _finite(v)]
    return float(np.median(finite)) if finite else math.nan


def _max(values: Sequence[float]) -> float:
    finite = [v for v in values if _finite(v)]
    return max(finite) if finite else math.nan
