"""Tables and plots of a sequential-editing study: python bench/report.py DIR

DIR holds one ``editserve eval --out`` JSON per run (``bench/study.sh`` writes them):
``<run>.json`` for CounterFact and ``zsre-<run>.json`` for zsRE; a run made in parts (a longer
run evaluated only at its end) is ``<run>~<part>.json``, its checkpoints merged by N. Writes
into DIR:
- ``study.json``: every run's checkpoints, side by side;
- ``table.md``: CounterFact at each N, and zsRE token accuracies;
- ``score_vs_n.png``: Score against the number of edits, one line per method;
- ``perplexity_vs_n.png``: the held-out perplexity ratio against N;
- ``retention_vs_n.png``: efficacy after N edits, the share of all N edits that still hold;
- ``delta_vs_n.png``: mean |W - W0| (over the edited layers) against the number of edits;
- ``zsre_vs_n.png`` (where there are zsRE runs): reliability and locality against N.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ORDER = [
    "memit-seq",
    "alphaedit",
    "d4s",
    "d4s-rect0.6",
    "d4s-rect0.4",
    "d4s-rect0.2",
    "memory",
    "memory-global0.9",
]


def _load(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    counterfact: dict[str, Any] = {}
    zsre: dict[str, Any] = {}
    for path in sorted(folder.glob("*.json")):
        if path.name == "study.json":
            continue
        run = json.loads(path.read_text())
        stem = path.stem.split("~")[0]
        runs = zsre if stem.startswith("zsre-") else counterfact
        name = stem.removeprefix("zsre-")
        if name in runs:  # another part: its checkpoints join the run's, by N
            points = {p["n_edits"]: p for p in runs[name]["checkpoints"] + run["checkpoints"]}
            run = {**run, "checkpoints": [points[n] for n in sorted(points)]}
        runs[name] = run
    return _ordered(counterfact), _ordered(zsre)


def _ordered(runs: dict[str, Any]) -> dict[str, Any]:
    rank = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(runs.items(), key=lambda kv: (rank.get(kv[0], len(ORDER)), kv[0])))


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def _label(name: str, point: dict[str, Any]) -> str:
    """The run's name, marked where it was replayed (bench/sweep_replay.py): the same weights as
    its edits one at a time, but no per-edit time."""
    return f"{name} (replayed)" if point.get("replayed") else name


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def counterfact_table(runs: dict[str, Any]) -> list[str]:
    lines = [
        "| method | N | efficacy | paraphrase | neighbourhood (before) | Score | fluency "
        "(before) | held-out ppl ratio | mean abs(W - W0) / mean abs(W0) | s/edit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        for point in run["checkpoints"]:
            w, dw = point["mean_abs_w_by_layer"], point["l1_delta_by_layer"]
            relative = _mean({k: dw[k] / (w[k] or 1.0) for k in dw})
            lines.append(
                f"| {_label(name, point)} | {point['n_edits']} | {_f(point['efficacy'])} | "
                f"{_f(point['paraphrase'])} | {_f(point['neighborhood'])} "
                f"({_f(point['neighborhood_before'])}) | {_f(point['score'])} | "
                f"{_f(point['fluency_after'], 2)} ({_f(point['fluency_before'], 2)}) | "
                f"{point['perplexity_after'] / point['perplexity_before']:.3f} | "
                f"{relative:.4f} | {_f(point['seconds_per_edit'], 2)} |"
            )
    return lines


def zsre_table(runs: dict[str, Any]) -> list[str]:
    lines = [
        "| method | N | reliability | generalisation | locality | held-out ppl ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        for point in run["checkpoints"]:
            acc = point["easyedit"]
            lines.append(
                f"| {_label(name, point)} | {point['n_edits']} | {_f(acc.get('reliability'))} | "
                f"{_f(acc.get('generalization'))} | {_f(acc.get('locality'))} | "
                f"{point['perplexity_after'] / point['perplexity_before']:.3f} |"
            )
    return lines


def plot_scores(runs: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, run in runs.items():
        points = run["checkpoints"]
        ax.plot([p["n_edits"] for p in points], [p["score"] for p in points], "o-", label=name)
    ax.set_xscale("log")
    ax.set_ylabel("Score (harmonic mean of efficacy,\nparaphrase and neighbourhood)")
    _style(ax, "CounterFact Score after N edits, SmolLM2-135M")
    _save(fig, path)


def plot_checkpoints(
    runs: dict[str, Any], path: Path, value: Any, ylabel: str, title: str, *, log_y: bool = False
) -> None:
    """One line per run of ``value(point)`` at each checkpoint."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, run in runs.items():
        points = run["checkpoints"]
        ax.plot([p["n_edits"] for p in points], [value(p) for p in points], "o-", label=name)
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    _style(ax, title)
    _save(fig, path)


def plot_deltas(runs: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, run in runs.items():
        # The longest run that kept one (a replayed checkpoint has none).
        traced = [p for p in run["checkpoints"] if p.get("trajectory")]
        if not traced:
            continue
        trajectory = traced[-1]["trajectory"]
        xs = [p["n_edits"] for p in trajectory]
        ys = [_mean(p["mean_abs_delta"]) for p in trajectory]
        ax.plot(xs, ys, "-", label=name)
    ax.set_ylabel("mean |W - W0| over the edited layers")
    _style(ax, "Growth of the edit (D4S paper, fig. 1's picture)")
    _save(fig, path)


def plot_zsre(runs: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, key in zip(axes, ("reliability", "locality"), strict=True):
        for name, run in runs.items():
            points = run["checkpoints"]
            xs = [p["n_edits"] for p in points]
            ax.plot(xs, [p["easyedit"].get(key) for p in points], "o-", label=name)
        ax.set_xscale("log")
        ax.set_ylabel(f"{key} (token accuracy)")
        _style(ax, f"zsRE {key} after N edits")
    _save(fig, path)


def _style(ax: Any, title: str) -> None:
    """What every plot's axes share: the x label, title, grid and legend."""
    ax.set_xlabel("sequential single edits (N)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/results/study")
    counterfact, zsre = _load(folder)
    if not counterfact and not zsre:
        sys.exit(f"no results in {folder}")
    lines = ["## CounterFact", "", *counterfact_table(counterfact)]
    if zsre:
        lines += ["", "## zsRE (token accuracies)", "", *zsre_table(zsre)]
    (folder / "table.md").write_text("\n".join(lines) + "\n")
    (folder / "study.json").write_text(
        json.dumps({"counterfact": counterfact, "zsre": zsre}, indent=1)
    )
    if counterfact:
        plot_scores(counterfact, folder / "score_vs_n.png")
        plot_checkpoints(
            counterfact,
            folder / "perplexity_vs_n.png",
            lambda p: p["perplexity_after"] / p["perplexity_before"],
            "held-out perplexity, edited / unedited",
            "Perplexity cost after N edits, SmolLM2-135M",
            log_y=True,
        )
        plot_checkpoints(
            counterfact,
            folder / "retention_vs_n.png",
            lambda p: p["efficacy"],
            "efficacy after N edits (share of\nall N edits that still hold)",
            "Retention after N edits, SmolLM2-135M",
        )
        plot_deltas(counterfact, folder / "delta_vs_n.png")
    if zsre:
        plot_zsre(zsre, folder / "zsre_vs_n.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
