"""HeapGuard (catmerge/merging/_heap.py): trims only past its slack, and never changes results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catmerge.merging import _heap, pcb


def test_the_guard_trims_once_the_rss_grew_past_its_slack_and_follows_the_level(monkeypatch):
    rss = iter([1000, 1100, 1300, 1050, 900, 1150, 1250, 1201])
    monkeypatch.setattr(_heap, "resident_bytes", lambda: next(rss))
    calls = []
    monkeypatch.setattr(_heap, "_malloc_trim", lambda: calls.append)
    guard = _heap.HeapGuard(slack=200)  # level 1000
    guard()  # 1100: within the slack
    assert calls == []
    guard()  # 1300 > 1200: trimmed, the level is what is left (1050)
    assert calls == [0] and guard.level == 1050
    guard()  # 900: the level follows it down
    assert guard.level == 900 and guard.trims == 1
    guard()  # 1150 > 1100: trimmed again; the level is the RSS read after it
    assert calls == [0, 0] and guard.level == 1250
    guard()  # 1201: within the slack, and below the level, which follows it
    assert guard.trims == 2 and guard.level == 1201


def test_the_guard_does_nothing_without_malloc_trim_or_proc(monkeypatch):
    monkeypatch.setattr(_heap, "_malloc_trim", lambda: None)
    guard = _heap.HeapGuard(slack=0)
    guard()
    assert guard.trims == 0


@pytest.mark.skipif(_heap.resident_bytes() is None or _heap._malloc_trim() is None, reason="glibc on Linux only")
def test_pcb_gives_the_same_merge_when_the_guard_trims_at_every_step(monkeypatch):
    torch.manual_seed(0)
    tvs = [{"w": torch.randn(64, 48), "b": torch.randn(48)} for _ in range(3)]
    params = pcb.PcbParams(drop_ratio=0.5, clip_ratio=0.01)
    monkeypatch.setattr(pcb, "CHUNK", 1000)
    monkeypatch.setattr(pcb, "GATHER_LIMIT", 100)  # radix passes, not one sort
    plain = pcb.merged_vector(tvs, params)
    made = []

    class EveryStep(_heap.HeapGuard):
        def __init__(self):
            super().__init__(slack=-(1 << 62))  # always past it
            made.append(self)

    monkeypatch.setattr(pcb, "HeapGuard", EveryStep)
    trimmed = pcb.merged_vector(tvs, params)
    assert sum(g.trims for g in made) > 0
    assert all(np.array_equal(plain[k].numpy(), trimmed[k].numpy()) for k in plain)
