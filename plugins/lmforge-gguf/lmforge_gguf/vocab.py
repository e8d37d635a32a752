"""Tokenizer metadata for GGUF: lmforge's tokenizers as llama.cpp's ``gpt2`` (byte-level BPE) vocabulary.

Both of lmforge's tokenizers are byte-level BPEs in llama.cpp's terms:

- :class:`~lmforge.tokenizers.ByteTokenizer` is a GPT-2 byte-level BPE with no merges: its 256 byte
  tokens are GPT-2's byte-to-unicode characters in byte order, and ``<|endoftext|>`` (256) is a
  control token. With no merges every byte stays one token, which is exactly what lmforge encodes.
- an :class:`~lmforge.tokenizers.HFTokenizer` whose tokenizer.json is a byte-level BPE with GPT-2's
  pre-tokenizer (what ``tokenizer: {name: bpe}`` trains) maps token for token, merges included.

Anything else (WordPiece, SentencePiece-style BPE with byte fallback, another split regex, a
normalizer) would tokenize differently in llama.cpp, so it is refused with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gguf import TokenType

from lmforge.tokenizers import EOS_TOKEN, ByteTokenizer, HFTokenizer
from lmforge_gguf.errors import GGUFError

GPT2_PRE = "gpt-2"
"""llama.cpp's name (tokenizer.ggml.pre) for GPT-2's pre-tokenizer regex."""


@dataclass
class Vocab:
    """What the GGUF tokenizer.ggml.* keys hold."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    eos_id: int
    bos_id: int
    model: str = "gpt2"
    pre: str = GPT2_PRE


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def vocab_for(tokenizer: Any, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of ``tokenizer``, padded with unused ``[PAD{i}]`` tokens to ``vocab_size``."""
    if tokenizer is None:
        raise GGUFError(
            "exporter gguf: the checkpoint holds no tokenizer, and llama.cpp needs one; "
            "export a checkpoint trained with a bytes, bpe or hf tokenizer"
        )
    if isinstance(tokenizer, ByteTokenizer):
        table = bytes_to_unicode()
        tokens = [table[b] for b in range(256)] + [EOS_TOKEN]
        types = [int(TokenType.NORMAL)] * 256 + [int(TokenType.CONTROL)]
        vocab = Vocab(tokens, types, merges=[], eos_id=tokenizer.eos_id, bos_id=tokenizer.eos_id)
    elif isinstance(tokenizer, HFTokenizer):
        vocab = _hf_vocab(tokenizer)
    else:
        raise GGUFError(
            f"exporter gguf: cannot express a {type(tokenizer).__name__} tokenizer in GGUF; "
            "only lmforge's ByteTokenizer and byte-level BPE HFTokenizers (bytes, bpe, hf) are supported"
        )
    if len(vocab.tokens) > vocab_size:
        raise GGUFError(
            f"exporter gguf: the tokenizer has {len(vocab.tokens)} tokens but the model's embedding only "
            f"{vocab_size} rows (model config vocab_size)"
        )
    for i in range(len(vocab.tokens), vocab_size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.token_types.append(int(TokenType.UNUSED))
    return vocab


def _hf_vocab(tokenizer: HFTokenizer) -> Vocab:
    spec = json.loads(tokenizer.to_dict()["tokenizer_json"])
    model = spec.get("model") or {}

    def refuse(why: str) -> GGUFError:
        return GGUFError(
            f"exporter gguf: the tokenizer is not a GPT-2 style byte-level BPE ({why}); "
            "llama.cpp would tokenize text differently, so it cannot be exported"
        )

    if model.get("type") != "BPE":
        raise refuse(f"its model is {model.get('type')!r}, not BPE")
    if model.get("byte_fallback"):
        raise refuse("it is a SentencePiece-style BPE with byte_fallback")
    if model.get("ignore_merges"):
        raise refuse("it sets ignore_merges")
    if spec.get("normalizer") is not None:
        raise refuse(f"it has a {spec['normalizer'].get('type')!r} normalizer")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel":
        raise refuse(f"its pre-tokenizer is {pre.get('type')!r}, not ByteLevel")
    if not pre.get("use_regex", True):
        raise refuse("its ByteLevel pre-tokenizer does not split with GPT-2's regex")
    if pre.get("add_prefix_space", False):
        raise refuse("its ByteLevel pre-tokenizer adds a prefix space")

    by_id: dict[int, str] = {int(i): tok for tok, i in model.get("vocab", {}).items()}
    types = {i: int(TokenType.NORMAL) for i in by_id}
    for added in spec.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    n = max(by_id) + 1 if by_id else 0
    # ids the tokenizer never uses (holes) become unused tokens, as convert_hf_to_gguf.py writes them
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    token_types = [types.get(i, int(TokenType.UNUSED)) for i in range(n)]

    merges = []
    for merge in model.get("merges") or []:
        if isinstance(merge, str):
            merges.append(merge)
        else:  # the [left, right] pair format of tokenizers >= 0.20; a space inside a part is written as U+0120
            merges.append(" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in merge))
    return Vocab(tokens, token_types, merges, eos_id=tokenizer.eos_id, bos_id=tokenizer.eos_id)
