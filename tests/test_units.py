"""Small pure pieces: strict config, stop strings, UTF-8-safe detokenization, sampling transforms."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch

from tokenrelay import config
from tokenrelay.wire import SamplingParams
from worker.detokenize import IncrementalDetokenizer, StopText
from worker.sampling import RowState, sample
from worker.settings import OPTIONS, WorkerSettings, default_served_name


@pytest.mark.parametrize("raw,expected", [("0", False), ("false", False), ("off", False), ("1", True), ("yes", True)])
def test_bool_parsing_is_strict(raw: str, expected: bool) -> None:
    assert config.parse_bool(raw) is expected


def test_bad_values_name_the_flag() -> None:
    with pytest.raises(config.ConfigError, match="--quantization"):
        config.resolve(OPTIONS, {"quantization": "9bit"}, {})
    with pytest.raises(config.ConfigError, match="TOKENRELAY_MAX_BATCH_SIZE"):
        config.resolve(OPTIONS, {}, {"TOKENRELAY_MAX_BATCH_SIZE": "0"})
    with pytest.raises(config.ConfigError, match="REDIS_URL"):
        config.resolve(OPTIONS, {}, {"REDIS_URL": "http://nope"})
    values = config.resolve(OPTIONS, {"max_batch_size": "3", "model": "m"}, {"TOKENRELAY_MAX_BATCH_SIZE": "9"})
    assert values["max_batch_size"] == 3  # the flag wins over the variable
    with pytest.raises(config.ConfigError, match="TOKENRELAY_PREFIX_CACHE_TOKENS"):
        config.resolve(OPTIONS, {}, {"TOKENRELAY_PREFIX_CACHE_TOKENS": "-1"})
    off = WorkerSettings.from_values(config.resolve(OPTIONS, {"model": "m"}, {"TOKENRELAY_PREFIX_CACHE_TOKENS": "0"}))
    assert off.prefix_cache_tokens == 0
    assert WorkerSettings.from_values(config.resolve(OPTIONS, {"model": "m"}, {})).prefix_cache_tokens == 1024
    assert WorkerSettings.from_values(config.resolve(OPTIONS, {"model": "m"}, {})).batch_wait_ms == 2.0
    never = config.resolve(OPTIONS, {"model": "m"}, {"TOKENRELAY_BATCH_WAIT_MS": "0"})
    assert WorkerSettings.from_values(never).batch_wait_ms == 0.0
    with pytest.raises(config.ConfigError, match="TOKENRELAY_BATCH_WAIT_MS"):
        config.resolve(OPTIONS, {}, {"TOKENRELAY_BATCH_WAIT_MS": "-1"})


def test_cli_refuses_a_bad_value_in_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "tokenrelay.cli", "worker", "--model", "x", "--dtype", "float8"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--dtype" in proc.stderr


def test_served_name_defaults() -> None:
    assert default_served_name("/x", "SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct"
    assert default_served_name("org/model-7b", None) == "org/model-7b"
    s = WorkerSettings.from_values(config.resolve(OPTIONS, {"model": "org/m"}, {}))
    assert s.served_model_name == "org/m"


def test_stop_text_spanning_deltas() -> None:
    stop = StopText(["END", "xyz"])
    assert stop.feed("hello E") == ("hello ", False)
    assert stop.feed("N") == ("", False)
    assert stop.feed("Dtail") == ("", True)
    other = StopText(["END"])
    assert other.feed("EN") == ("", False)
    assert other.feed("x") == ("ENx", False)
    assert other.flush() == ""
    held = StopText(["END"])
    assert held.feed("abcE") == ("abc", False)
    assert held.flush() == "E"


def test_detokenizer_never_emits_half_a_character() -> None:
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    from tests.models import make_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(make_tiny_llama(Path(tmp)))
    text = "café 東京 🙂 ok"
    ids = tok(text)["input_ids"]
    detok = IncrementalDetokenizer(tok, [])
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some tokens ended inside a multi-byte character


def _row(**kw: object) -> RowState:
    return RowState(SamplingParams(**kw), None, [], [])  # type: ignore[arg-type]


def test_greedy_top_k_top_p_min_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4))
    rows = [_row(temperature=0), _row(top_k=1), _row(top_p=0.5), _row(min_p=0.7)]
    for _ in range(20):
        tokens, _ = sample(logits.clone(), rows)
        assert tokens == [0, 0, 0, 0]
    rows = [_row(top_p=0.8)] * 4
    seen = {t for _ in range(200) for t in sample(logits.clone(), rows)[0]}
    assert seen == {0, 1}


def test_penalties_bias_and_seed() -> None:
    logits = torch.zeros(1, 5)
    biased, _ = sample(logits.clone(), [_row(temperature=0, logit_bias={3: 5.0})])
    assert biased == [3]
    row = RowState(SamplingParams(temperature=0, presence_penalty=2.0), None, [], [0])
    assert sample(torch.tensor([[1.0, 0.5, 0, 0, 0]]), [row])[0] == [1]
    row = RowState(SamplingParams(temperature=0, repetition_penalty=3.0), None, [0], [])
    assert sample(torch.tensor([[1.0, 0.5, 0, 0, 0]]), [row])[0] == [1]
    draws = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(5)
        draws.append([sample(torch.zeros(1, 50), [RowState(SamplingParams(), gen, [], [])])[0][0]
                      for _ in range(10)])
    assert draws[0] == draws[1]


def test_logprobs_are_raw_model_logprobs() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    _, lps = sample(logits.clone(), [_row(temperature=0, logprobs=2)])
    expected = torch.log_softmax(logits, -1)[0]
    assert lps[0] is not None
    assert lps[0].token_id == 0 and lps[0].logprob == pytest.approx(float(expected[0]))
    assert [t for t, _ in lps[0].top] == [0, 1]


def test_kv_budget_refuses_what_can_never_fit() -> None:
    """prompt + max_tokens over the worker's KV budget is a 400, not a request queued forever."""
    import tempfile
    import time
    from pathlib import Path

    from transformers import AutoTokenizer

    from tests.models import make_tiny_llama
    from tokenrelay.wire import Job
    from worker.errors import ContextLengthExceeded
    from worker.prompts import prepare

    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(make_tiny_llama(Path(tmp)))

    def job(max_tokens: int | None) -> Job:
        return Job(request_id="r", model="m", kind="completion", deadline=time.time() + 5, prompts=["Hello world"],
                   sampling=SamplingParams(max_tokens=max_tokens))

    fits = prepare(tok, job(10), context_length=4096, max_request_tokens=64)
    assert fits.max_tokens == [10]
    assert prepare(tok, job(None), context_length=4096, max_request_tokens=64).max_tokens == [64 - len(fits.ids[0])]
    with pytest.raises(ContextLengthExceeded, match="per-request token limit is 64") as exc:
        prepare(tok, job(100), context_length=4096, max_request_tokens=64)
    assert exc.value.status == 400 and exc.value.param == "max_tokens"


def test_piled_up_outputs_merge_per_choice() -> None:
    from worker.outputs import ChoiceOutput, merge
    from worker.sampling import TokenLogprob

    lp = [TokenLogprob(i, -float(i), []) for i in range(3)]
    merged = merge([ChoiceOutput(0, "a", 1, None, [lp[0]]), ChoiceOutput(1, "x", 1),
                    ChoiceOutput(0, "b", 1, None, [lp[1]]), ChoiceOutput(0, "c", 1, "length", [lp[2]])])
    summary = [(o.index, o.text, o.tokens, o.finish_reason) for o in merged]
    assert summary == [(0, "abc", 3, "length"), (1, "x", 1, None)]
    assert [t.token_id for t in merged[0].logprobs] == [0, 1, 2]


def test_onednn_linears_match_torch_and_can_be_undone(tiny_model: object) -> None:
    from transformers import AutoModelForCausalLM

    from worker.cpu_kernels import layouts_of, restore_linears, use_onednn_linears

    # Tied, as SmolLM2: the output projection shares the input embeddings' weight.
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    model.get_output_embeddings().weight = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    dense = {id(m): m.weight.detach().clone() for m in linears}
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        assert use_onednn_linears(model) == len(linears) > 0
        assert use_onednn_linears(model) == len(linears)  # a second call changes nothing
        got = model(input_ids=ids).logits
        one_row = model(input_ids=ids[:1, :1]).logits
    assert torch.allclose(got, expected, atol=1e-4) and not torch.equal(got, torch.zeros_like(got))
    assert torch.allclose(one_row, expected[:1, :1], atol=1e-4)
    # The packed weight replaces the parameter, except where another module shares it.
    embed = model.get_input_embeddings().weight
    for m in linears:
        assert m.weight.is_mkldnn == (m.weight is not embed)
    # The packed layers may move to the plain layout for one or two rows (Layouts), a few per step.
    layouts = layouts_of(model)
    assert layouts is not None
    assert layouts.owned and all(m.weight.is_mkldnn for m in layouts.owned)
    layouts.small_rows_dense, layouts.DWELL_S, layouts.STEP_BUDGET_S = False, 0.0, 0.0
    for _ in range(3):
        layouts.fit(1)
    assert layouts.packed and all(m.weight.is_mkldnn for m in layouts.owned)  # not where MKL was slower
    layouts.small_rows_dense = True
    layouts.fit(1)
    assert layouts.packed  # the first step on the other side starts the dwell
    layouts.fit(1)
    assert not layouts.packed and sum(not m.weight.is_mkldnn for m in layouts.owned) == 1  # one layer per step
    layouts.fit(8)  # many rows again: the move waits while they dwell
    assert not layouts.packed and sum(not m.weight.is_mkldnn for m in layouts.owned) == 1
    with torch.inference_mode():
        mixed = model(input_ids=ids).logits  # layers in both layouts at once
    while any(m.weight.is_mkldnn for m in layouts.owned):
        layouts.fit(2)
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
    assert torch.allclose(mixed, expected, atol=1e-4) and torch.allclose(plain, expected, atol=1e-4)
    layouts.set_packed(True)
    assert all(m.weight.is_mkldnn for m in layouts.owned)
    layouts.set_packed(False)
    # Inputs that need gradients still get them (through the plain kernel).
    model.train()
    model(input_ids=ids).logits.sum().backward()
    assert embed.grad is not None and embed.grad.abs().sum() > 0
    other = torch.nn.Linear(2, 2)
    other.forward = lambda x: x  # an instance forward that is not ours (as accelerate's hooks)
    model.add_module("not_ours", other)
    restore_linears(model)
    assert "forward" in other.__dict__
    for m in linears:
        assert "forward" not in m.__dict__ and not m.weight.is_mkldnn and m.weight.requires_grad
        assert torch.equal(m.weight.detach(), dense[id(m)])


def test_cpu_linear_setting_is_strict() -> None:
    assert WorkerSettings.from_values(config.resolve(OPTIONS, {"model": "m"}, {})).cpu_linear == "onednn"
    values = config.resolve(OPTIONS, {"model": "m"}, {"TOKENRELAY_CPU_LINEAR": "torch"})
    assert WorkerSettings.from_values(values).cpu_linear == "torch"
    with pytest.raises(config.ConfigError, match="--cpu-linear"):
        config.resolve(OPTIONS, {"model": "m", "cpu_linear": "mkl"}, {})



def test_engine_builds_the_mask_only_for_plain_causal_sdpa() -> None:
    """Sliding windows, chunked attention and other attention kernels get transformers' own mask."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from worker.engine import _plain_sdpa

    def config(cls: Any, attn: str = "sdpa", **kwargs: Any) -> Any:
        c = cls(**kwargs)
        c._attn_implementation = attn
        return c

    assert _plain_sdpa(config(LlamaConfig))
    assert not _plain_sdpa(config(LlamaConfig, attn="eager"))
    assert not _plain_sdpa(config(MistralConfig, sliding_window=4096))
    assert _plain_sdpa(config(MistralConfig, sliding_window=None))
    assert _plain_sdpa(config(Qwen2Config, use_sliding_window=False))
    assert not _plain_sdpa(config(Qwen2Config, use_sliding_window=True, sliding_window=64, max_window_layers=0))


def test_roomy_cache_layer_matches_dynamic_layer() -> None:
    """In-place columns, growing past the room, and tensors replaced from outside (KVBatch.select)."""
    from transformers.cache_utils import DynamicLayer

    from worker.kvbatch import ROOM, RoomyLayer, _replace

    gen = torch.Generator().manual_seed(0)
    roomy, plain = RoomyLayer(), DynamicLayer()
    widths = [5] + [1] * (2 * ROOM + 3)
    for step, width in enumerate(widths):
        k, v = torch.randn(3, 2, width, 4, generator=gen), torch.randn(3, 2, width, 6, generator=gen)
        got, want = roomy.update(k, v), plain.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        if step == ROOM:  # as KVBatch.select: new tensors from outside; the old buffers go at once
            idx = torch.tensor([2, 0, 1])
            assert roomy._buffers is not None
            _replace(roomy, roomy.keys.index_select(0, idx), roomy.values.index_select(0, idx))
            assert roomy._buffers is None
            assert plain.keys is not None and plain.values is not None
            plain.keys, plain.values = plain.keys.index_select(0, idx), plain.values.index_select(0, idx)
        if step == ROOM + 5:  # assigned without _replace: the identity check still notices
            roomy.keys, roomy.values = roomy.keys.clone(), roomy.values.clone()
    assert roomy.get_seq_length() == sum(widths)


def test_release_openmp_threads_ends_the_callers_team() -> None:
    """Engine.start relies on it: the loading thread's OpenMP workers exit, and come back on demand."""
    import os
    import threading

    from worker.openmp import release_openmp_threads

    if torch.get_num_threads() < 2:
        pytest.skip("one CPU thread: no OpenMP team to release")
    result: dict[str, int | bool] = {}

    def body() -> None:  # a fresh thread: no team of its own yet, whatever pytest's main thread did
        def count() -> int:
            return len(os.listdir("/proc/self/task"))

        start = count()
        torch.ones(4_000_000).add_(1)  # large enough for a parallel region
        result["with_team"] = count() - start
        result["released"] = release_openmp_threads()
        result["after"] = count() - start

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert result["released"] is True
    assert result["with_team"] == torch.get_num_threads() - 1 and result["after"] == 0


def test_up_takes_and_forwards_every_worker_flag() -> None:
    from tokenrelay.cli import _parser
    from tokenrelay.launcher import UP_OPTIONS, worker_argv

    args = vars(_parser().parse_args(["up", "--cpu-linear", "torch", "--job-timeout", "30", "--workers", "2"]))
    args.pop("command")
    values = config.resolve(UP_OPTIONS, args, {})
    argv = worker_argv(values, "served")
    assert argv[argv.index("--cpu-linear") + 1] == "torch"
    assert float(argv[argv.index("--job-timeout") + 1]) == 30
    assert argv.count("--served-model-name") == 1 and "--workers" not in argv and "--redis-url" not in argv
    # Every worker setting that has a value reaches the worker.
    given = {o.flag for o in OPTIONS if values.get(o.dest) is not None} - {"--redis-url"}
    assert given <= set(argv) and "--cpu-linear" in given


def test_up_starts_one_gateway_process_per_cpu_unless_told() -> None:
    from tokenrelay.launcher import AUTO_GATEWAY_PROCESSES, UP_OPTIONS, gateway_processes

    assert gateway_processes(config.resolve(UP_OPTIONS, {"gateway_processes": "3"}, {})) == 3
    auto = gateway_processes(config.resolve(UP_OPTIONS, {}, {}))
    if sys.platform.startswith("linux"):
        assert auto == min(len(os.sched_getaffinity(0)), AUTO_GATEWAY_PROCESSES)
    else:
        assert auto == 1
    with pytest.raises(config.ConfigError, match="--gateway-processes"):
        config.resolve(UP_OPTIONS, {"gateway_processes": "-1"}, {})


def test_encode_gives_the_ids_the_tokenizer_call_gives(tiny_model: object) -> None:
    from transformers import AutoTokenizer

    from worker.prompts import encode

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    assert getattr(tok, "backend_tokenizer", None) is not None  # the fast path is the one tested
    texts = ["Hello world", " leading space", "café 東京", "a" * 300, "", "\n\n  x", tok.eos_token]
    texts.append(tok.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False,
                                         add_generation_prompt=True))
    for text in texts:
        for special in (True, False):
            assert encode(tok, text, add_special_tokens=special) == list(
                tok(text, add_special_tokens=special)["input_ids"])
