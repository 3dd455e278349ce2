"""The comparison's rounds: each system's point at each concurrency comes from its best round."""

from __future__ import annotations

from typing import Any

from bench.compare import best_of_rounds


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
