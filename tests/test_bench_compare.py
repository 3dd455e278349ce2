"""The comparison's rounds (each point from its best round) and its overhead repeats (their median)."""

from __future__ import annotations

from typing import Any

from bench.compare import best_of_rounds, overhead_summary
from bench.report import overhead_section, targets


def _point(users: int, tok_s: float, note: str = "") -> dict[str, Any]:
    return {"users": users, "tok_s": tok_s, "note": note}


def test_each_point_is_its_best_round_and_says_so() -> None:
    rounds = [
        {"tokenrelay": [_point(1, 18.4), _point(8, 91.0)], "llama_cpp": [_point(1, 39.0)]},
        {"tokenrelay": [_point(1, 20.1, "measured twice"), _point(8, 87.8)], "engine": [_point(1, 19.0)]},
    ]
    best = best_of_rounds(rounds)
    assert [p["tok_s"] for p in best["tokenrelay"]] == [20.1, 91.0]
    assert best["tokenrelay"][0]["note"] == "measured twice; best of 2 rounds (tok/s 18.4 / 20.1)"
    assert best["tokenrelay"][1]["note"] == "best of 2 rounds (tok/s 91.0 / 87.8)"
    # A system measured in one round only keeps its point as it was.
    assert best["llama_cpp"] == [_point(1, 39.0)]
    assert best["engine"] == [_point(1, 19.0)]
    # The rounds' own records are not changed.
    assert rounds[0]["tokenrelay"][1]["note"] == ""


def test_one_round_is_passed_through() -> None:
    rounds = [{"tokenrelay": [_point(1, 18.4), _point(32, 187.8)]}]
    assert best_of_rounds(rounds) == rounds[0]


def _pair(engine_ttft: tuple[float, float], relay_ttft: tuple[float, float]) -> dict[str, Any]:
    def side(ttft: tuple[float, float]) -> dict[str, Any]:
        return {"ttft_ms": {"p50": ttft[0], "p90": ttft[1], "p99": ttft[1]}, "itl_ms": {"p50": 5.0}, "tok_s": 4000.0}

    return {"engine": side(engine_ttft), "tokenrelay": side(relay_ttft),
            "overhead_p50_ms": round(relay_ttft[0] - engine_ttft[0], 2),
            "overhead_p99_ms": round(relay_ttft[1] - engine_ttft[1], 2)}


def _overhead_targets(overhead: dict[str, Any]) -> dict[str, Any]:
    data = {"systems": {}, "max_tokens": 64, "command": "x", "overhead": overhead}
    return {t.name.split(",")[0]: t for t in targets(data) if "overhead" in t.name}


def test_the_overhead_figure_is_the_median_of_its_repeats_and_says_so() -> None:
    repeats = [_pair((5.0, 9.0), (60.0, 80.0)), _pair((6.0, 10.0), (14.0, 38.0)), _pair((5.0, 9.0), (25.0, 99.0))]
    ov = overhead_summary(32, 4, repeats)
    assert (ov["overhead_p50_ms"], ov["overhead_p99_ms"]) == (20.0, 71.0)
    found = _overhead_targets(ov)
    p50, p99 = found["gateway+queue overhead p50"], found["gateway+queue overhead p99"]
    assert p50.measured.startswith("20.00 ms (median of 3 repeats: 55.0 / 8.0 / 20.0 ms")
    assert p99.measured.startswith("71.00 ms (median of 3 repeats: 71.0 / 28.0 / 90.0 ms")
    assert (p50.met, p99.met) == (False, False)
    section = "\n".join(overhead_section(ov, 64))
    assert "| engine alone (2) | 6.00 |" in section and "| overhead (3) | 20.00 | | 90.00 |" in section
    assert "| **overhead, median** | **20.00** | | **71.00** |" in section
    # A run from before the repeats (one pair at the top level) reads as one repeat.
    old = {"users": 32, "requests_per_user": 4, **_pair((5.0, 9.0), (30.0, 50.0))}
    assert _overhead_targets(old)["gateway+queue overhead p50"].measured == (
        "25.00 ms (TTFT p50 30.00 ms through tokenrelay − 5.00 ms engine alone)")
    assert "| **overhead** | **25.00** | | **41.00** |" in "\n".join(overhead_section(old, 64))
