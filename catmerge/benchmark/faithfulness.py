"""Is a benchmark in the regime merging papers measure? The criteria, computed from test accuracies.

Every criterion is about the regime (what the 8-task CLIP benchmark looks like), never about where
one method lands; CAT's standing is reported beside them as an outcome. Over several runs (seeds),
a level is judged on the mean over runs, and an ordering "a above b by more than m" holds when
the mean of the per-run differences a - b, less m, exceeds their sample standard deviation (the
seed spread). With one run the spread is unknown: the ordering is judged on that run's difference
alone and the table says so.

  1  8 tasks on 8 distinct image domains: no two tasks share source images
  2  pretrained zero-shot average in [35, 60]; every task at least 10 points above chance
  3  every expert at least 15 points above its zero-shot; expert average at least 80
  4  Task Arithmetic's normalized average in [65, 85]; weight averaging at least 3 points below it
  5  TA above weight averaging; TIES not below TA by more than 1; RegMean above TA; TSV-M at least
     5 above TA (each by more than the seed spread)
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Run:
    """One built benchmark's test results: accuracy[task][row] in percent (rows "pretrained",
    "expert" and the methods), the number of classes per task, and per task the name of the image
    pool its inputs come from (two tasks with one pool share source images)."""

    accuracy: dict[str, dict[str, float]]
    classes: dict[str, int]
    images: dict[str, str]


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


def _normalized(run: Run, row: str) -> float:
    return _mean([100.0 * run.accuracy[t][row] / run.accuracy[t]["expert"] if run.accuracy[t]["expert"] else 0.0
                  for t in run.accuracy])


def _spread(values: list[float]) -> str:
    return f" (sd {statistics.stdev(values):.1f} over {len(values)} runs)" if len(values) > 1 else ""


def _tasks_where(runs: list[Run], failing) -> list[str]:
    """Tasks (of the first run) where `failing(task, mean accuracy of row)` holds on the mean over runs."""
    def mean_of(task: str, row: str) -> float:
        return _mean([r.accuracy[task][row] for r in runs])
    return [t for t in runs[0].accuracy if failing(t, mean_of)]


def _differences(runs: list[Run], above: str, below: str) -> list[float] | None:
    """Per run, the average of `above` less that of `below`; None when a run lacks either row."""
    if not all(row in r.accuracy[t] for row in (above, below) for r in runs for t in r.accuracy):
        return None
    return [_average(r, above) - _average(r, below) for r in runs]


def ordering(runs: list[Run], above: str, below: str, margin: float) -> tuple[str, bool | None]:
    """("measured" text, passed) for `above` - `below` > `margin` by more than the seed spread."""
    differences = _differences(runs, above, below)
    if differences is None:
        return f"not measured: {above} or {below} missing from the runs", None
    mean = _mean(differences)
    if len(differences) == 1:
        return f"{mean:+.1f} (one run: spread unknown)", mean - margin > 0
    sd = statistics.stdev(differences)
    return f"{mean:+.1f}, sd {sd:.1f} over {len(differences)} runs", mean - margin > sd


def criteria(runs: list[Run]) -> list[Criterion]:
    """Every criterion of the module docstring, in order, for these runs (same tasks in each)."""
    if not runs:
        raise ValueError("faithfulness: no runs given")
    first = runs[0]
    tasks = list(first.accuracy)
    for r in runs[1:]:
        if list(r.accuracy) != tasks:
            raise ValueError(f"faithfulness: runs of different tasks ({tasks} and {list(r.accuracy)})")
    out = []

    pools: dict[str, list[str]] = {}
    for t in tasks:
        pools.setdefault(first.images[t], []).append(t)
    shared = [f"{', '.join(ts)} share {pool}" for pool, ts in pools.items() if len(ts) > 1]
    out.append(Criterion("1", "8 tasks on 8 distinct image domains",
                         f"{len(tasks)} tasks, {len(pools)} image pools" + (f" ({'; '.join(shared)})" if shared else ""),
                         len(tasks) == 8 and len(pools) == 8))

    zero_shot = [_average(r, "pretrained") for r in runs]
    level = _mean(zero_shot)
    out.append(Criterion("2a", "pretrained zero-shot average in [35, 60]", f"{level:.1f}{_spread(zero_shot)}",
                         35 <= level <= 60))
    near_chance = _tasks_where(runs, lambda t, acc: acc(t, "pretrained") < 100.0 / first.classes[t] + 10)
    out.append(Criterion("2b", "every task's zero-shot at least 10 points above chance",
                         f"{len(tasks) - len(near_chance)} of {len(tasks)}" + (f"; not: {', '.join(near_chance)}" if near_chance else ""),
                         not near_chance))

    weak = _tasks_where(runs, lambda t, acc: acc(t, "expert") < acc(t, "pretrained") + 15)
    out.append(Criterion("3a", "every expert at least 15 points above its zero-shot",
                         f"{len(tasks) - len(weak)} of {len(tasks)}" + (f"; not: {', '.join(weak)}" if weak else ""),
                         not weak))
    experts = [_average(r, "expert") for r in runs]
    out.append(Criterion("3b", "expert average at least 80", f"{_mean(experts):.1f}{_spread(experts)}", _mean(experts) >= 80))

    if all("task_arithmetic" in r.accuracy[t] for r in runs for t in tasks):
        normalized = [_normalized(r, "task_arithmetic") for r in runs]
        out.append(Criterion("4a", "Task Arithmetic's normalized average in [65, 85]",
                             f"{_mean(normalized):.1f}{_spread(normalized)}", 65 <= _mean(normalized) <= 85))
    else:
        out.append(Criterion("4a", "Task Arithmetic's normalized average in [65, 85]", "not measured: no task_arithmetic in the runs", None))
    gaps = _differences(runs, "task_arithmetic", "weight_averaging")
    out.append(Criterion("4b", "weight averaging at least 3 points below Task Arithmetic",
                         "not measured: task_arithmetic or weight_averaging missing from the runs" if gaps is None
                         else f"{_mean(gaps):.1f}{_spread(gaps)}", None if gaps is None else _mean(gaps) >= 3))

    for number, text, above, below, margin in [
        ("5a", "Task Arithmetic above weight averaging", "task_arithmetic", "weight_averaging", 0.0),
        ("5b", "TIES not below Task Arithmetic by more than 1", "ties", "task_arithmetic", -1.0),
        ("5c", "RegMean above Task Arithmetic", "regmean", "task_arithmetic", 0.0),
        ("5d", "TSV-M at least 5 above Task Arithmetic", "tsv_m", "task_arithmetic", 5.0),
    ]:
        out.append(Criterion(number, text + " (by more than the seed spread)", *ordering(runs, above, below, margin)))
    return out


def outcomes(runs: list[Run], method: str = "cat") -> list[tuple[str, str]]:
    """What is reported, not judged: `method` against Task Arithmetic and TSV-M (mean differences)."""
    rows = []
    for other in ("task_arithmetic", "tsv_m"):
        measured, _ = ordering(runs, method, other, 0.0)
        rows.append((f"{method} - {other}", measured))
    return rows


def table(rows: list[Criterion], reported: list[tuple[str, str]] = ()) -> str:
    """Markdown: one line per criterion with PASS / FAIL / n/a, then the reported outcomes."""
    mark = {True: "PASS", False: "FAIL", None: "n/a"}
    lines = ["| # | criterion | measured | |", "|---|---|---|---|"]
    lines += [f"| {c.number} | {c.text} | {c.measured} | {mark[c.passed]} |" for c in rows]
    lines += [f"| - | {what} (reported, not a criterion) | {measured} | |" for what, measured in reported]
    passed = sum(c.passed is True for c in rows)
    lines.append(f"\n{passed} of {len(rows)} criteria met.")
    return "\n".join(lines)
