"""Per-request records and the summary every benchmark reports (same definitions everywhere).

TTFT: from sending the request to the first non-empty piece of generated text.
ITL: the gaps between successive non-empty pieces of text after the first.
TPOT: per request, (e2e - TTFT) / (output tokens - 1).
e2e: from sending the request to the end of its stream.
tok/s: all output tokens / wall time from the first request sent to the last one finished.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    start: float  # perf_counter seconds
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def spread(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 and mean, in milliseconds."""
    out: dict[str, float | None] = {}
    for q in (50, 90, 99):
        v = percentile(values, q)
        out[f"p{q}"] = None if v is None else round(v * 1000.0, 2)
    out["mean"] = round(sum(values) / len(values) * 1000.0, 2) if values else None
    return out


@dataclass
class Result:
    system: str
    users: int
    requests: int
    completed: int
    errors: int
    wall_s: float
    output_tokens: int
    tok_s: float
    req_s: float
    ttft_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    tpot_ms: dict[str, float | None]
    e2e_ms: dict[str, float | None]
    tokens_per_request: dict[str, float | None]
    error_samples: list[str] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(system: str, users: int, records: list[RequestRecord], wall_s: float, note: str = "") -> Result:
    ok = [r for r in records if r.error is None]
    bad = [r for r in records if r.error is not None]
    tokens = sum(r.output_tokens for r in records)
    counts = [float(r.output_tokens) for r in ok]
    samples = sorted({r.error for r in bad if r.error})[:5]
    return Result(
        system=system,
        users=users,
        requests=len(records),
        completed=len(ok),
        errors=len(bad),
        wall_s=round(wall_s, 3),
        output_tokens=tokens,
        tok_s=round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
        req_s=round(len(ok) / wall_s, 3) if wall_s > 0 else 0.0,
        ttft_ms=spread([r.ttft for r in ok if r.ttft is not None]),
        itl_ms=spread([g for r in ok for g in r.itl]),
        tpot_ms=spread([t for r in ok if (t := r.tpot) is not None]),
        e2e_ms=spread([r.e2e for r in ok if r.e2e is not None]),
        tokens_per_request={
            "min": min(counts) if counts else None,
            "mean": round(sum(counts) / len(counts), 2) if counts else None,
            "max": max(counts) if counts else None,
        },
        error_samples=samples,
        note=note,
    )


def print_json(report: object, path: str | None) -> None:
    """Print a benchmark's JSON report, and write it to ``path`` when one is given."""
    text = json.dumps(report, indent=2)
    if path:
        with open(path, "w") as fh:
            fh.write(text + "\n")
    print(text)
