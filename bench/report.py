"""docs/benchmarks.md and docs/benchmarks.png from one comparison run's JSON.

python -m bench.report bench/results/<stamp>/compare.json   # rewrite the docs from a saved run
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LABELS = {
    "tokenrelay": "tokenrelay (`tokenrelay up`: gateway processes, one per CPU up to 4, + Redis/arq + worker)",
    "engine": "engine alone (in-process `worker.engine.Engine`)",
    "plain_generate": "plain `model.generate`, static batch of B = users",
    "transformers_serve": "`transformers serve --continuous-batching`",
    "llama_cpp": "llama-cpp-python server (GGUF Q4_1, `--interrupt_requests false`)",
}
SHORT = {
    "tokenrelay": "tokenrelay",
    "engine": "engine alone",
    "plain_generate": "plain generate",
    "transformers_serve": "transformers serve CB",
    "llama_cpp": "llama-cpp-python",
}
GIB_KIB = 2**20


def _point(data: dict[str, Any], system: str, users: int) -> dict[str, Any] | None:
    for p in data["systems"].get(system, []):
        if p["users"] == users:
            point: dict[str, Any] = p
            return point
    return None


def _tok_s(data: dict[str, Any], system: str, users: int) -> float | None:
    p = _point(data, system, users)
    return float(p["tok_s"]) if p and p["completed"] else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


@dataclass
class Target:
    name: str
    required: str
    measured: str
    met: bool | None  # None: not measured in this run
    margin: str


def _ratio_target(name: str, value: float | None, need: float, what: str) -> Target:
    if value is None:
        return Target(name, f"≥ {need:g}×", f"not measured ({what})", None, "–")
    return Target(name, f"≥ {need:g}×", f"{value:.2f}× ({what})", value >= need, f"{(value / need - 1) * 100:+.0f}%")


def _limit_target(name: str, value: float | None, limit: float, unit: str, what: str) -> Target:
    if value is None:
        return Target(name, f"≤ {limit:g} {unit}", f"not measured ({what})", None, "–")
    return Target(
        name,
        f"≤ {limit:g} {unit}",
        f"{value:.2f} {unit} ({what})",
        value <= limit,
        f"{limit - value:.2f} {unit} headroom" if value <= limit else f"over by {value - limit:.2f} {unit}",
    )


def overhead_repeats(ov: dict[str, Any]) -> list[dict[str, Any]]:
    """The overhead point's engine-alone/tokenrelay pairs (a run before repeats holds one pair
    at the top level)."""
    if "repeats" in ov:
        repeats: list[dict[str, Any]] = ov["repeats"]
        return repeats
    return [ov] if "engine" in ov and "tokenrelay" in ov else []


def targets(data: dict[str, Any]) -> list[Target]:
    tr1, tr32 = _tok_s(data, "tokenrelay", 1), _tok_s(data, "tokenrelay", 32)
    out = [
        _ratio_target(
            "1 user: tokenrelay vs plain generate (batch 1)",
            _ratio(tr1, _tok_s(data, "plain_generate", 1)),
            0.95,
            f"{_fmt(tr1)} vs {_fmt(_tok_s(data, 'plain_generate', 1))} tok/s",
        ),
        _ratio_target(
            "32 users: tokenrelay vs plain generate static batch of 32",
            _ratio(tr32, _tok_s(data, "plain_generate", 32)),
            1.0,
            f"{_fmt(tr32)} vs {_fmt(_tok_s(data, 'plain_generate', 32))} tok/s",
        ),
        _ratio_target(
            "32 users: tokenrelay vs tokenrelay at 1 user",
            _ratio(tr32, tr1),
            6.0,
            f"{_fmt(tr32)} vs {_fmt(tr1)} tok/s",
        ),
    ]
    for peer, need in (("transformers_serve", 1.5), ("llama_cpp", 2.0)):
        for users in (8, 32):
            tr, other = _tok_s(data, "tokenrelay", users), _tok_s(data, peer, users)
            reason = data.get("skipped", {}).get(peer)
            what = f"{_fmt(tr)} vs {_fmt(other)} tok/s" if reason is None else f"skipped: {reason[:120]}"
            out.append(_ratio_target(f"{users} users: tokenrelay vs {SHORT[peer]}", _ratio(tr, other), need, what))
    ov = data.get("overhead") or {}
    users = ov.get("users", 32)
    repeats = overhead_repeats(ov)
    for q, limit in (("p50", 10.0), ("p99", 30.0)):
        value = ov.get(f"overhead_{q}_ms")
        if value is None:
            what = "overhead run missing"
        elif len(repeats) == 1:
            what = (f"TTFT {q} {_fmt(repeats[0]['tokenrelay']['ttft_ms'][q], 2)} ms through tokenrelay − "
                    f"{_fmt(repeats[0]['engine']['ttft_ms'][q], 2)} ms engine alone")
        else:
            each = " / ".join(_fmt(r[f"overhead_{q}_ms"], 1) for r in repeats)
            what = f"median of {len(repeats)} repeats: {each} ms, each TTFT {q} through tokenrelay − engine alone"
        out.append(_limit_target(f"gateway+queue overhead {q}, tiny model, {users} users", value, limit, "ms", what))
    rss = data.get("rss") or {}
    peak = rss.get("peak_vmrss_kib")
    out.append(
        _limit_target(
            f"worker RSS, SmolLM2, {rss.get('users', 32)} users",
            peak / GIB_KIB if peak else None,
            1.5,
            "GiB",
            f"peak VmRSS sampled every 0.25 s; VmHWM {_fmt((rss.get('vmhwm_kib') or 0) / GIB_KIB, 2)} GiB"
            if peak
            else "not sampled",
        )
    )
    return out


def _system_table(data: dict[str, Any], system: str) -> list[str]:
    tr1 = _tok_s(data, "tokenrelay", 1)
    rows = [
        "| users | requests | tok/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | e2e p50 ms "
        "| tokens/req | errors | × plain generate | × tokenrelay@1 | other CPU % | load avg |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in data["systems"][system]:
        plain = _tok_s(data, "plain_generate", p["users"])
        tpr = p["tokens_per_request"]["mean"]
        rows.append(
            f"| {p['users']} | {p['completed']}/{p['requests']} | {_fmt(p['tok_s'])} | {_fmt(p['req_s'], 2)} "
            f"| {_fmt(p['ttft_ms']['p50'])} | {_fmt(p['ttft_ms']['p99'])} | {_fmt(p['itl_ms']['p50'], 2)} "
            f"| {_fmt(p['e2e_ms']['p50'], 0)} | {_fmt(tpr)} | {p['errors']} "
            f"| {_fmt(_ratio(p['tok_s'], plain), 2)} | {_fmt(_ratio(p['tok_s'], tr1), 2)} "
            f"| {_fmt(p.get('foreign_cpu_pct'))} | {_fmt(p.get('load_before'), 2)} |"
        )
    notes = [(p["users"], p["note"]) for p in data["systems"][system] if p.get("note")]
    errors = sorted({e for p in data["systems"][system] for e in p.get("error_samples", [])})
    for users, n in notes:
        rows.append(f"\nNote (users={users}): {n}")
    if notes or errors:
        rows.append("")
    for e in errors[:3]:
        rows.append(f"\nError sample: `{e[:200]}`")
    return rows


def markdown(data: dict[str, Any], png_name: str, json_path: Path | None) -> str:
    m = data["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Written by `bench/compare.py` from one run; every figure below comes from that run. "
        "Regenerate with the command under *How this was measured*."
        + (
            f" Exception: {', '.join(data['replaced'])} were disturbed by other work on this shared machine "
            "and were measured again in a second, shorter run (see each table's notes)."
            if data.get("replaced")
            else ""
        ),
        "",
        f"- Date: {data['started']}; the run took {_fmt(data.get('total_s'), 0)} s",
        f"- Machine: {m.get('cpu', '?')}, {m.get('nproc', '?')} CPUs (`nproc`), "
        f"{m.get('memory_gib', '?')} GiB memory, no GPU; torch {m.get('torch', '?')}, "
        f"transformers {m.get('transformers', '?')}, Python {m.get('python', '?')}",
        f"- Model: SmolLM2-135M-Instruct, fp32 (`{data['model_dir']}`, converted from "
        f"`{Path(data['gguf_file']).name}`; llama-cpp-python reads that GGUF itself)",
        f"- Workload: streaming chat requests, {data['max_tokens']} output tokens each (greedy; "
        "`ignore_eos` where the server knows it), users send back to back; requests per user "
        + ", ".join(f"{u} users: {k}" for u, k in data["requests_per_user"].items())
        + f"; no request starts more than {_fmt(data['duration_cap_s'], 0)} s into a point"
        + (
            f", and requests still running {_fmt(data['hard_cap_s'], 0)} s into it are cut (counted as errors)."
            if data.get("hard_cap_s")
            else "."
        ),
        *(
            [
                f"- Rounds: every system was measured {len(data['rounds'])} times, in turn (all systems, then all "
                "again); each point is that system's best round by tok/s, and its note gives every round's "
                "figure. Other tenants of this shared machine only ever slow a point down."
            ]
            if data.get("rounds")
            else []
        ),
        "",
        "## Targets",
        "",
        "| target | required | measured | met | margin |",
        "|---|---|---|---|---|",
    ]
    for t in targets(data):
        met = "n/a" if t.met is None else ("**yes**" if t.met else "**no**")
        lines.append(f"| {t.name} | {t.required} | {t.measured} | {met} | {t.margin} |")
    lines += ["", f"![tokens/s and TTFT against concurrency]({png_name})", ""]
    for system in LABELS:
        if system in data["systems"]:
            lines += [f"## {LABELS[system]}", "", *_system_table(data, system), ""]
    if data.get("skipped"):
        lines += ["## Not measured", ""]
        for name, why in data["skipped"].items():
            lines.append(f"- {name}: {why.splitlines()[0][:300]}")
        lines.append("")
    if data.get("overhead"):
        lines += overhead_section(data["overhead"], data["max_tokens"])
    rss = data.get("rss")
    if rss:
        lines += [
            "## Worker memory",
            "",
            f"`VmRSS` of the worker process (pid found among `tokenrelay up`'s children), sampled every "
            f"0.25 s during the {rss['users']}-user point: peak {rss['peak_vmrss_kib'] / GIB_KIB:.2f} GiB "
            f"({rss['samples']} samples); `VmHWM` (peak since start, loading included) "
            f"{_fmt((rss.get('vmhwm_kib') or 0) / GIB_KIB, 2)} GiB.",
            "",
        ]
    lines += [
        "## How this was measured",
        "",
        "```",
        data["command"],
        "```",
        "",
        "- All systems run one after another on loopback on this machine; the load generator "
        "(`bench/loadgen.py`: uvloop and its own HTTP/1.1 client, `bench/http1.py`) shares the CPUs with the server "
        "under test.",
        "- TTFT: request sent → first non-empty content delta. ITL: gaps between content deltas. "
        "e2e: request sent → end of stream. tok/s: all output tokens / wall time of the point. "
        "Output tokens come from the usage chunk (`stream_options.include_usage`) or, without one, one per "
        "content chunk.",
        "- Engine alone: the same workload in-process (`bench/engine_bench.py`), TTFT = submit → first "
        "non-empty text. Plain generate: one `model.generate` call over B = users identical-length prompts, "
        "greedy, `min_new_tokens = max_new_tokens`; TTFT = a separate `max_new_tokens=1` call; all rows end "
        "together, so e2e is the call's time.",
        "- transformers serve refuses unknown fields (422), so it gets no `ignore_eos`; llama-cpp-python "
        "ignores it. Their replies may end early on EOS: *tokens/req* shows what they really produced, and "
        "tok/s counts only those tokens. llama-cpp-python serves the Q4_1 GGUF (quantized weights), the "
        "others the same weights dequantized to fp32.",
        "- *other CPU %*: CPU time used during the point by processes other than the system under test "
        "and the load generator, as a share of all CPUs (this machine is shared; above a few % the "
        "point was disturbed). *load avg*: the 1-minute load average just before the point.",
        f"- Raw results: `{json_path}`" if json_path else "",
        "",
    ]
    return "\n".join(lines)


def overhead_section(ov: dict[str, Any], max_tokens: int) -> list[str]:
    repeats = overhead_repeats(ov)
    how = "Overhead = TTFT through tokenrelay − TTFT of the engine alone, per percentile"
    if len(repeats) > 1:
        how += (f", in each of {len(repeats)} repeats (the engine alone, then tokenrelay); the figure is "
                "the median over the repeats")
    lines = [
        "## Gateway + queue overhead",
        "",
        f"Tiny random Llama (`tests/models.py: make_tiny_llama`), {ov['users']} users × "
        f"{ov['requests_per_user']} requests, {max_tokens} tokens each. {how}.",
        "",
        "| | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | ITL p50 ms | tok/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for i, repeat in enumerate(repeats, 1):
        tag = f" ({i})" if len(repeats) > 1 else ""
        for key in ("engine", "tokenrelay"):
            p = repeat[key]
            lines.append(
                f"| {SHORT[key]}{tag} | {_fmt(p['ttft_ms']['p50'], 2)} | {_fmt(p['ttft_ms']['p90'], 2)} "
                f"| {_fmt(p['ttft_ms']['p99'], 2)} | {_fmt(p['itl_ms']['p50'], 2)} | {_fmt(p['tok_s'])} |"
            )
        if len(repeats) > 1:
            lines.append(f"| overhead{tag} | {_fmt(repeat['overhead_p50_ms'], 2)} | "
                         f"| {_fmt(repeat['overhead_p99_ms'], 2)} | | |")
    label = "overhead, median" if len(repeats) > 1 else "overhead"
    p50, p99 = _fmt(ov["overhead_p50_ms"], 2), _fmt(ov["overhead_p99_ms"], 2)
    return [*lines, f"| **{label}** | **{p50}** | | **{p99}** | | |", ""]


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for system in LABELS:
        points = data["systems"].get(system)
        if not points:
            continue
        xs = [p["users"] for p in points]
        ax1.plot(xs, [p["tok_s"] for p in points], marker="o", label=SHORT[system])
        ax2.plot(xs, [p["ttft_ms"]["p50"] for p in points], marker="o", label=SHORT[system])
    ax1.set(
        xscale="log",
        xlabel="concurrent users",
        ylabel="output tokens/s (aggregate)",
        title=f"Throughput, SmolLM2-135M fp32, {data['max_tokens']} tokens/request",
    )
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent users",
        ylabel="TTFT p50 (ms)",
        title="Time to first token (p50)",
    )
    for ax in (ax1, ax2):
        ax.set_xticks(data["users"], [str(u) for u in data["users"]])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(data: dict[str, Any], docs: Path, json_path: Path | None) -> tuple[Path, Path]:
    docs.mkdir(parents=True, exist_ok=True)
    png = docs / "benchmarks.png"
    plot(data, png)
    md = docs / "benchmarks.md"
    shown = json_path
    if json_path is not None:
        try:
            shown = json_path.resolve().relative_to(Path(__file__).resolve().parent.parent)
        except ValueError:
            shown = json_path
    text = markdown(data, png.name, shown)
    # Hand-written diagnosis and measurements from other commands live beside the generated file
    # and are appended, so regenerating never loses them.
    notes = docs / "benchmarks-notes.md"
    if notes.exists():
        text = text.rstrip("\n") + "\n\n" + notes.read_text()
    md.write_text(text)
    return md, png


def replace_disturbed(data: dict[str, Any], other: dict[str, Any], other_name: str) -> list[str]:
    """Take ``other``'s point wherever ``data``'s same system and concurrency was more disturbed
    (more CPU used by other processes); each taken point says so. Returns what was replaced."""
    replaced = []
    for system, points in other.get("systems", {}).items():
        mine = data["systems"].get(system, [])
        for new in points:
            for i, old in enumerate(mine):
                if old["users"] != new["users"]:
                    continue
                if (new.get("foreign_cpu_pct") or 0.0) < (old.get("foreign_cpu_pct") or 0.0):
                    new = dict(new)
                    new["note"] = (
                        (new.get("note") or "") + f"; re-measured in run {other_name} at {other['started']} "
                        f"(this run's try was disturbed: {old.get('foreign_cpu_pct')}% other CPU, "
                        f"{old['tok_s']} tok/s)"
                    ).lstrip("; ")
                    mine[i] = new
                    replaced.append(f"{system} users={new['users']}")
    if replaced:
        data.setdefault("replaced", []).extend(replaced)
        data["command"] += (
            f"\n{other['command']}\n"
            f"python -m bench.report {data.get('json_path', 'RUN.json')} --replace-from {other_name}"
        )
    return replaced


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    p.add_argument("json_path", type=Path)
    p.add_argument("--docs", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    p.add_argument(
        "--replace-from",
        type=Path,
        action="append",
        default=[],
        help="another run's JSON: its points replace this run's more disturbed ones (marked in the docs)",
    )
    args = p.parse_args(argv)
    data = json.loads(args.json_path.read_text())
    for other_path in args.replace_from:
        other = json.loads(other_path.read_text())
        data["json_path"] = str(args.json_path)
        replaced = replace_disturbed(data, other, str(other_path))
        print(f"replaced from {other_path}: {', '.join(replaced) or 'nothing'}")
    md, png = write_docs(data, args.docs, args.json_path)
    print(f"wrote {md} and {png}")


if __name__ == "__main__":
    main()
