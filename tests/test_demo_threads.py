"""``sparselora demo`` picks a CPU thread count that fits a shared machine (issue 12, item 9)."""
import os

import pytest
import torch

from sparselora.cli import build_parser
from sparselora.demo import _latency_lines, pick_threads


@pytest.mark.parametrize("cpus,load,want", [(2, 13.2, 1), (2, 0.1, 2), (2, 0.9, 1), (16, 3.4, 13), (4, 9.0, 1)])
def test_threads_follow_idle_cores(monkeypatch, cpus, load, want):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    n, why = pick_threads()
    assert n == want and f"{cpus} CPUs available" in why and f"{load:.1f}" in why


def test_threads_never_exceed_torchs_default(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert pick_threads()[0] == 4


def test_threads_option():
    args = build_parser().parse_args(["demo", "--threads", "3"])
    assert pick_threads(args.threads) == (3, "--threads")
    assert build_parser().parse_args(["demo"]).threads is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--threads", "0"])


def test_latency_table_says_it_is_not_the_products_speed():
    row = {"shape": "384x384", "tokens": 256, "dense_ms": 1.0, "sparse_ms": 2.0, "backend": "reference"}
    md = "\n".join(_latency_lines([row], {"dense": 1.0, "sparse": 2.0, "batch": [4, 8]}))
    assert "NOT the product's speed" in md and "noisy" in md and "| 384x384 | 256 | 1.000 | 2.000 | 2.00 |" in md
