"""Loading the benchmarked model: saved weights, or random weights built from a config folder.

The random-weights mode is for machines that can't receive the real weights (only config.json
and the tokenizer files travel): the shapes, and therefore the speed, are the real model's.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class BenchModel:
    model: Any
    tokenizer: Any
    eos_token_ids: set[int]
    source: str
    random_weights: bool


def torch_dtype(name: str) -> torch.dtype:
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def _quantization(name: str, dtype: torch.dtype) -> Any:
    if name == "none":
        return None
    from transformers import BitsAndBytesConfig

    if name == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            eos.add(value)
        elif value:
            eos.update(int(v) for v in value)
    return eos


def load_model(
    model_dir: str | None,
    *,
    random_weights_from: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    quantization: str = "none",
    seed: int = 0,
) -> BenchModel:
    """From ``model_dir`` (safetensors folder), or random weights from ``random_weights_from``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = random_weights_from or model_dir
    if source is None:
        raise ValueError("give a model folder or --random-weights-from")
    tokenizer = AutoTokenizer.from_pretrained(source)
    tdtype = torch_dtype(dtype)
    quant = _quantization(quantization, tdtype)
    if random_weights_from:
        torch.manual_seed(seed)
        config = AutoConfig.from_pretrained(random_weights_from)
        if quant is None:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=tdtype)
        else:
            # bitsandbytes quantizes while loading: save the random model once, then load it.
            model = AutoModelForCausalLM.from_config(config, dtype=tdtype)
            with tempfile.TemporaryDirectory(prefix="bench-random-") as tmp:
                model.save_pretrained(tmp)
                del model
                model = AutoModelForCausalLM.from_pretrained(
                    tmp, dtype=tdtype, quantization_config=quant, device_map=device
                )
    else:
        kwargs: dict[str, Any] = {"dtype": tdtype, "device_map": device}
        if quant is not None:
            kwargs["quantization_config"] = quant
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    model.eval()
    return BenchModel(model, tokenizer, _eos_ids(model, tokenizer), source, bool(random_weights_from))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
