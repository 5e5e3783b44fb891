"""Metrics summary and the results table."""

from __future__ import annotations

import pytest

from catmerge.evaluation import results_table, summarize


def test_summary_averages_and_normalizes_per_task():
    per_task = {
        "a": {"pretrained": 10.0, "expert": 80.0, "task_arithmetic": 40.0},
        "b": {"pretrained": 30.0, "expert": 50.0, "task_arithmetic": 50.0},
    }
    metrics = summarize(per_task, ["task_arithmetic"])
    assert metrics["average"] == {"pretrained": 20.0, "expert": 65.0, "task_arithmetic": 45.0}
    assert metrics["normalized"]["task_arithmetic"]["a"] == pytest.approx(50.0)
    assert metrics["normalized"]["task_arithmetic"]["b"] == pytest.approx(100.0)
    # normalized average is the mean of per-task ratios, not the ratio of averages
    assert metrics["normalized_average"]["task_arithmetic"] == pytest.approx(75.0)
    assert metrics["normalized_average"]["expert"] == pytest.approx(100.0)

    table = results_table(metrics).splitlines()
    assert table[0] == "| model | a | b | avg | normalized avg |"
    assert table[2] == "| pretrained | 10.0 | 30.0 | 20.0 | 36.2 |"
    assert table[4] == "| task_arithmetic | 40.0 | 50.0 | 45.0 | 75.0 |"
