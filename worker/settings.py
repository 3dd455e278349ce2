"""The worker's settings: flags and TOKENRELAY_* variables, parsed strictly."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenrelay import config
from tokenrelay.config import Option

ENGINE_NICE = 19  # the relay first: docs/benchmarks-notes.md, "Who gets a core" (both sessions)
BATCH_WAIT_MS = 2.0  # a wave of 32 on 2 CPUs: docs/benchmarks-notes.md, "Built: `--batch-wait-ms`"
PREFIX_CACHE_TOKENS = 1024  # SmolLM2: 46 KiB per token, so ~46 MiB (worker/prefixcache.py)
DEFAULT_CACHE_DIR = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tokenrelay")

OPTIONS: list[Option] = [
    config.REDIS_URL,
    Option("--model", config.text, None, "model name or path (Hugging Face id, local folder, or GGUF folder)"),
    Option("--gguf-file", config.text, None, "GGUF file inside --model (or a path to one)"),
    Option("--served-model-name", config.text, None, "name clients use in `model` (default: from --model)"),
    Option("--quantization", config.choice("none", "8bit", "4bit"), "none", "bitsandbytes quantization"),
    Option("--device-map", config.text, "auto", "accelerate device_map: auto, cpu, cuda:0, ..."),
    Option("--dtype", config.choice("auto", "float32", "bfloat16", "float16"), "auto", "weights dtype"),
    Option("--cpu-linear", config.choice("onednn", "torch"), "onednn",
           "float32 linear layers on the CPU: oneDNN, packed (faster for decoding several rows; MKL's for "
           "one or two rows where that measured faster at load), or torch's default (MKL)"),
    Option("--engine-nice", config.int_in(0, 19), ENGINE_NICE,
           "how much lower the engine thread runs on the CPU than the worker's event loop (Linux nice "
           "increment; 0: the same): relaying requests and tokens then never waits behind the model "
           "for a core; the model takes whatever CPU nothing else on the machine wants"),
    Option("--max-batch-size", config.int_in(1, 4096), 32, "most sequences generated at once"),
    Option("--batch-wait-ms", config.float_in(0.0, 1000.0), BATCH_WAIT_MS,
           "after concurrent load, how long an idle engine waits for more requests before it prefills "
           "(until this long passes with none new or they fill --max-batch-size, at most 5 times over), "
           "so a burst is prefilled in one pass; a lone user never waits; 0: never"),
    Option("--kv-cache-memory", config.float_in(0.01), 4.0, "KV cache budget in GiB"),
    Option("--kv-cache-tokens", config.int_in(0), 0, "KV cache budget in tokens (0: from --kv-cache-memory)"),
    Option("--prefix-cache-tokens", config.int_in(0), PREFIX_CACHE_TOKENS,
           "prompt-prefix KV kept for prompts that start alike (a shared system prompt or template is "
           "then not recomputed), in tokens, beside the KV cache budget; 0: off"),
    Option("--default-temperature", config.float_in(0.0, 2.0), None,
           "temperature for requests that set none (default: 1.0, as OpenAI)"),
    Option("--default-top-p", config.float_in(0.0, 1.0), None, "top_p for requests that set none (default: 1.0)"),
    # Only the fallback for a lost wake-up (gateways wake workers at each enqueue, a worker claims
    # as a row frees): every poll is a Redis round trip that preempts the model's threads, and at
    # one user 0.05 s cost ~2 % of the tokens/s on 2 CPUs (docs/benchmarks-notes.md).
    Option("--poll-delay", config.float_in(0.0, 5.0), 0.5,
           "seconds between queue polls (gateways also wake workers at each enqueue)"),
    Option("--job-timeout", config.float_in(1.0), 600.0, "longest a single request may generate, seconds"),
    Option("--cache-dir", config.text, DEFAULT_CACHE_DIR, "where converted GGUF models are kept"),
]


def default_served_name(model: str, gguf_file: str | None) -> str:
    if gguf_file:
        stem = Path(gguf_file).name.removesuffix(".gguf")
        # "SmolLM2-135M-Instruct.Q4_1" -> "SmolLM2-135M-Instruct": clients name the model, not the file.
        return re.sub(r"[.-](q\d\w*|f16|f32|bf16|iq\d\w*)$", "", stem, flags=re.IGNORECASE)
    path = Path(model)
    return path.name if path.exists() else model


@dataclass(frozen=True)
class WorkerSettings:
    redis_url: str
    model: str
    gguf_file: str | None
    served_model_name: str
    quantization: str
    device_map: str
    dtype: str
    max_batch_size: int
    batch_wait_ms: float
    kv_cache_memory: float
    kv_cache_tokens: int
    prefix_cache_tokens: int
    default_temperature: float | None
    default_top_p: float | None
    poll_delay: float
    job_timeout: float
    cache_dir: str
    cpu_linear: str
    engine_nice: int

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> WorkerSettings:
        if not values.get("model"):
            raise config.ConfigError("--model: required (a Hugging Face id, a folder, or a GGUF folder)")
        values = dict(values)
        if not values.get("served_model_name"):
            values["served_model_name"] = default_served_name(values["model"], values.get("gguf_file"))
        return cls(**values)
