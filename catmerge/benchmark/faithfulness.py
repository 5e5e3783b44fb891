"""Is a benchmark in the regime merging papers measure? The criteria, computed from test accuracies.

Every criterion is about the regime (what the 8-task CLIP benchmark looks like), never about where
one method lands; CAT's standing is reported beside them as an outcome.

  1  8 tasks on 8 distinct image domains: no two tasks share source images
  2  pretrained zero-shot average in [35, 60]; every task at least 10 points above chance
  3  every expert at least 15 points above its zero-shot; expert average at least 80
  4  Task Arithmetic's normalized average in [65, 85]; weight averaging at least 3 points below it
  5  TA above weight averaging; TIES not below TA by more than 1; RegMean above TA; TSV-M at least
     5 above TA (each by more than the seed spread)

Over several runs (seeds), levels (2 to 4, the 3-point gap of 4 included) are judged on the mean
over runs. An ordering of 5, "a - b above m" (or "at least m"), holds when the mean of the per-run
differences a - b, less m, is above (at least) their sample standard deviation: the seed spread.
With one run the spread is unknown and taken as 0; the table says so. Normalized accuracy is the
merged accuracy over the expert's, averaged over tasks; a task whose expert scores 0 is left out
of it and named.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Run:
    """One built benchmark's test results: accuracy[task][row] in percent (rows "pretrained",
    "expert" and the methods), the number of classes per task, and per task the pool its images
    come from (two tasks naming one pool share source images)."""

    accuracy: dict[str, dict[str, float]]
    classes: dict[str, int]
    image_pool: dict[str, str]


@dataclass(frozen=True)
class Criterion:
    number: str
    text: str
    measured: str
    passed: bool | None  # None: not measured (a method missing from the runs)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def _average(run: Run, row: str) -> float:
    return _mean([run.accuracy[t][row] for t in run.accuracy])


def _spread(values: list[float]) -> str:
    return f" (sd {statistics.stdev(values):.1f} over {len(values)} runs)" if len(values) > 1 else ""


def _mean_accuracy(runs: list[Run], task: str, row: str) -> float:
    return _mean([r.accuracy[task][row] for r in runs])


def _differences(runs: list[Run], above: str, below: str) -> list[float] | None:
    """Per run, the average of `above` less that of `below`; None when a run lacks either row."""
    if not all(row in r.accuracy[t] for row in (above, below) for r in runs for t in r.accuracy):
        return None
    return [_average(r, above) - _average(r, below) for r in runs]


def ordering(runs: list[Run], above: str, below: str, margin: float, inclusive: bool = False) -> tuple[str, bool | None]:
    """("measured" text, passed) for `above` - `below` above `margin` (at least, if `inclusive`)
    by more than the seed spread."""
    differences = _differences(runs, above, below)
    if differences is None:
        return f"not measured: {above} or {below} missing from the runs", None
    mean = _mean(differences)
    sd = statistics.stdev(differences) if len(differences) > 1 else 0.0
    passed = mean - margin >= sd if inclusive else mean - margin > sd
    spread = f"sd {sd:.1f} over {len(differences)} runs" if len(differences) > 1 else "one run: spread unknown"
    return f"{mean:+.1f} ({spread})", passed


def check_runs(runs: list[Run]) -> None:
    """Runs of one benchmark: the same tasks, classes and image pools, every task with its
    pretrained and expert rows and at least one class."""
    if not runs:
        raise ValueError("faithfulness: no runs given")
    first = runs[0]
    for i, r in enumerate(runs):
        if set(r.accuracy) != set(first.accuracy) or r.classes != first.classes or r.image_pool != first.image_pool:
            raise ValueError(f"faithfulness: run {i + 1} is of another benchmark (tasks, classes or image pools differ from run 1's)")
        for task, rows in r.accuracy.items():
            missing = [row for row in ("pretrained", "expert") if row not in rows]
            if missing or r.classes.get(task, 0) < 1 or task not in r.image_pool:
                raise ValueError(f"faithfulness: run {i + 1}, task {task}: needs rows pretrained and expert, "
                                 f"a class count and an image pool (missing rows {missing}, classes {r.classes.get(task)})")


def _normalized_task_arithmetic(runs: list[Run]) -> Criterion:
    text = "Task Arithmetic's normalized average in [65, 85]"
    if _differences(runs, "task_arithmetic", "expert") is None:
        return Criterion("4a", text, "not measured: task_arithmetic missing from the runs", None)
    tasks = [t for t in runs[0].accuracy if all(r.accuracy[t]["expert"] > 0 for r in runs)]
    dropped = [t for t in runs[0].accuracy if t not in tasks]
    if not tasks:
        return Criterion("4a", text, "not measured: every expert scores 0", None)
    values = [_mean([100.0 * r.accuracy[t]["task_arithmetic"] / r.accuracy[t]["expert"] for t in tasks]) for r in runs]
    note = f"; left out, expert at 0: {', '.join(dropped)}" if dropped else ""
    return Criterion("4a", text, f"{_mean(values):.1f}{_spread(values)}{note}", 65 <= _mean(values) <= 85)


def criteria(runs: list[Run]) -> list[Criterion]:
    """Every criterion of the module docstring, in order, for these runs of one benchmark."""
    check_runs(runs)
    first = runs[0]
    tasks = list(first.accuracy)
    out = []

    pools: dict[str, list[str]] = {}
    for t in tasks:
        pools.setdefault(first.image_pool[t], []).append(t)
    shared = [f"{', '.join(ts)} share {pool}" for pool, ts in pools.items() if len(ts) > 1]
    out.append(Criterion("1", "8 tasks on 8 distinct image domains",
                         f"{len(tasks)} tasks, {len(pools)} image pools" + (f" ({'; '.join(shared)})" if shared else ""),
                         len(tasks) == 8 and len(pools) == 8))

    zero_shot = [_average(r, "pretrained") for r in runs]
    out.append(Criterion("2a", "pretrained zero-shot average in [35, 60]", f"{_mean(zero_shot):.1f}{_spread(zero_shot)}",
                         35 <= _mean(zero_shot) <= 60))
    near_chance = [t for t in tasks if _mean_accuracy(runs, t, "pretrained") < 100.0 / first.classes[t] + 10]
    out.append(Criterion("2b", "every task's zero-shot at least 10 points above chance",
                         f"{len(tasks) - len(near_chance)} of {len(tasks)}" + (f"; not: {', '.join(near_chance)}" if near_chance else ""),
                         not near_chance))

    weak = [t for t in tasks if _mean_accuracy(runs, t, "expert") < _mean_accuracy(runs, t, "pretrained") + 15]
    out.append(Criterion("3a", "every expert at least 15 points above its zero-shot",
                         f"{len(tasks) - len(weak)} of {len(tasks)}" + (f"; not: {', '.join(weak)}" if weak else ""),
                         not weak))
    experts = [_average(r, "expert") for r in runs]
    out.append(Criterion("3b", "expert average at least 80", f"{_mean(experts):.1f}{_spread(experts)}", _mean(experts) >= 80))

    out.append(_normalized_task_arithmetic(runs))
    gaps = _differences(runs, "task_arithmetic", "weight_averaging")
    out.append(Criterion("4b", "weight averaging at least 3 points below Task Arithmetic (mean over runs)",
                         "not measured: task_arithmetic or weight_averaging missing from the runs" if gaps is None
                         else f"{_mean(gaps):.1f}{_spread(gaps)}", None if gaps is None else _mean(gaps) >= 3))

    for number, text, above, below, margin, inclusive in [
        ("5a", "Task Arithmetic above weight averaging", "task_arithmetic", "weight_averaging", 0.0, False),
        ("5b", "TIES not below Task Arithmetic by more than 1", "ties", "task_arithmetic", -1.0, True),
        ("5c", "RegMean above Task Arithmetic", "regmean", "task_arithmetic", 0.0, False),
        ("5d", "TSV-M at least 5 above Task Arithmetic", "tsv_m", "task_arithmetic", 5.0, True),
    ]:
        out.append(Criterion(number, text + " (by more than the seed spread)", *ordering(runs, above, below, margin, inclusive)))
    return out


def outcomes(runs: list[Run], method: str = "cat") -> list[tuple[str, str]]:
    """What is reported, not judged: `method` against Task Arithmetic and TSV-M (mean differences)."""
    return [(f"{method} - {other}", ordering(runs, method, other, 0.0)[0]) for other in ("task_arithmetic", "tsv_m")]


def table(rows: list[Criterion], reported: list[tuple[str, str]] = ()) -> str:
    """Markdown: one line per criterion with PASS / FAIL / n/a, then the reported outcomes."""
    mark = {True: "PASS", False: "FAIL", None: "n/a"}
    lines = ["| # | criterion | measured | |", "|---|---|---|---|"]
    lines += [f"| {c.number} | {c.text} | {c.measured} | {mark[c.passed]} |" for c in rows]
    lines += [f"| - | {what} (reported, not a criterion) | {measured} | |" for what, measured in reported]
    passed = sum(c.passed is True for c in rows)
    lines.append(f"\n{passed} of {len(rows)} criteria met.")
    return "\n".join(lines)
