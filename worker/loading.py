"""``from_pretrained`` with the worker's settings; GGUF files are converted once and cached."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    context_length: int
    eos_token_ids: set[int]
    kv_bytes_per_token: int


def _gguf_source(settings: WorkerSettings) -> tuple[str, str]:
    """(folder, file name) as transformers wants them for ``gguf_file=``."""
    assert settings.gguf_file is not None
    path = Path(settings.gguf_file)
    if not path.is_absolute():
        path = Path(settings.model) / path
    if path.is_file():
        return str(path.parent), path.name
    return settings.model, settings.gguf_file


def _converted_dir(settings: WorkerSettings) -> Path:
    folder, name = _gguf_source(settings)
    file = Path(folder) / name
    stamp = f"{file.resolve()}:{file.stat().st_size}:{file.stat().st_mtime_ns}" if file.exists() else str(file)
    digest = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    return Path(settings.cache_dir) / "models" / f"{Path(name).stem}-{digest}"


def convert_gguf(settings: WorkerSettings) -> Path:
    """Dequantize the GGUF once into a safetensors folder; later starts load that in seconds."""
    target = _converted_dir(settings)
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = _gguf_source(settings)
    log.info("converting %s/%s to %s (once; later starts reuse it)", folder, name, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True)
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a crash or a second worker never sees half a folder.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, target)
    except OSError:  # another worker finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dtype(name: str) -> Any:
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _quantization_config(settings: WorkerSettings) -> Any:
    if settings.quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if settings.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.float32 if settings.dtype in ("auto", "float32") else _dtype(settings.dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)


def load(settings: WorkerSettings) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(convert_gguf(settings)) if settings.gguf_file else settings.model
    log.info("loading %s (dtype=%s, device_map=%s, quantization=%s)", source, settings.dtype,
             settings.device_map, settings.quantization)
    tokenizer = AutoTokenizer.from_pretrained(source)
    kwargs: dict[str, Any] = {"dtype": _dtype(settings.dtype), "device_map": settings.device_map}
    quant = _quantization_config(settings)
    if quant is not None:
        kwargs["quantization_config"] = quant
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    model.eval()
    if settings.cpu_linear == "onednn":
        from worker.cpu_kernels import layouts_of, use_onednn_linears

        if count := use_onednn_linears(model):
            layouts = layouts_of(model)
            small = layouts is not None and layouts.small_rows_dense
            log.info("%d float32 CPU linear layers run on oneDNN (--cpu-linear torch: MKL)%s", count,
                     "; on MKL for one or two rows, where it measured faster" if small else "")
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    context = int(getattr(cfg, "max_position_embeddings", 0) or getattr(tokenizer, "model_max_length", 2048))
    eos: set[int] = set()
    for value in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            eos.add(value)
        elif value:
            eos.update(int(v) for v in value)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = 2 if str(model.dtype) in ("torch.bfloat16", "torch.float16") else 4
    per_token = 2 * cfg.num_hidden_layers * heads * head_dim * elem
    return Loaded(model, tokenizer, context, eos, per_token)
