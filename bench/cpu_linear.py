"""One decode step of a model with torch's float32 linears (MKL) and with oneDNN's, alternating.

The worker's ``--cpu-linear onednn`` (worker/cpu_kernels.py) rests on this measurement: B rows
after a 40-token prompt, ``--steps`` decode steps per sample, the two kernels alternating so the
machine's drift hits both alike; the median of ``--repeats`` samples each.

    python -m bench.cpu_linear --model ~/.cache/tokenrelay/models/SmolLM2-135M-Instruct.Q4_1-* --batch 1,8,32
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from bench.stats import print_json
from worker.cpu_kernels import restore_linears, use_onednn_linears


def _step_ms(model: Any, rows: int, steps: int) -> float:
    ids = torch.randint(100, 1000, (rows, 40))
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - start) / steps * 1000


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM

    p = argparse.ArgumentParser(prog="python -m bench.cpu_linear", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a saved model folder")
    p.add_argument("--batch", default="1,8,32", help="comma-separated row counts")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    report: dict[str, Any] = {"model": args.model, "threads": torch.get_num_threads(), "points": []}
    with torch.inference_mode():
        probe = torch.randint(100, 1000, (2, 30))
        restore_linears(model)
        expected = model(input_ids=probe).logits
        patched = use_onednn_linears(model)
        got = model(input_ids=probe).logits
        report["linears_on_onednn"] = patched
        report["max_abs_logit_diff"] = float((got - expected).abs().max())
        report["same_argmax"] = bool((got.argmax(-1) == expected.argmax(-1)).all())
        for rows in (int(b) for b in args.batch.split(",")):
            samples: dict[str, list[float]] = {"torch": [], "onednn": []}
            for r in range(args.repeats):
                for kind in ("torch", "onednn") if r % 2 == 0 else ("onednn", "torch"):
                    if kind == "onednn":
                        use_onednn_linears(model)
                    else:
                        restore_linears(model)
                    samples[kind].append(_step_ms(model, rows, args.steps))
            median = {k: statistics.median(v) for k, v in samples.items()}
            point = {"rows": rows, "torch_ms": round(median["torch"], 2), "onednn_ms": round(median["onednn"], 2),
                     "speedup": round(median["torch"] / median["onednn"], 3)}
            report["points"].append(point)
            print(f"rows={rows}: step {point['torch_ms']} ms (torch/MKL) vs {point['onednn_ms']} ms (oneDNN): "
                  f"{point['speedup']}x", flush=True)
    print_json(report, args.json)


if __name__ == "__main__":
    main()
