"""Text generation with a key/value cache: greedy decoding, temperature, top-k and top-p sampling.

- :func:`generate` turns prompts (one batch, left-padded) into their continuations, stopping each
  row at the end-of-text token, at a stop string (cut off) or after ``max_new_tokens``, and can
  stream the text as it is produced.
- :func:`generate_ids` is the same loop on token ids.
- :func:`generate_completions` is :func:`generate` with each continuation's token ids and finish
  reason; the ``lmforge generate MODEL --prompt TEXT`` command (:func:`lmforge.commands.generate_command`)
  runs it:
  MODEL is an lmforge ``.ckpt``, a folder written by ``lmforge export``, or a Hugging Face folder or Hub
  id (loaded by :func:`lmforge.checkpoint.load_base`).

Context length: a prompt and its continuation together never exceed the model's ``block_size``
tokens. A prompt that leaves no room (``block_size`` tokens or more, a beginning-of-text token
included) is an error, never silently truncated; a continuation is cut short at ``block_size``
(with one warning) when ``max_new_tokens`` does not fit.

The cache (``use_cache=True``, the default) runs the prompt once and then one token per step;
``use_cache=False`` runs the whole sequence again at every step (the reference, for tests). With a
``seed``, sampling draws from its own ``torch.Generator``: the same seed gives the same text.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lmforge.errors import MissingFileError, UserError

log = logging.getLogger(__name__)

FinishReason = str  # "eos" | "stop" | "length"


@dataclass
class Completion:
    """One prompt's continuation: its text, its new token ids (end-of-text excluded) and why it ended."""

    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    """eos (end-of-text token), stop (a stop string, cut off) or length (max_new_tokens or block_size)."""


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> None:
    """Raise a one-line ValueError for sampling settings out of range."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"temperature={temperature!r} must be a number >= 0 (0 is greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"top_k={top_k!r} must be a positive integer")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise UserError(f"top_p={top_p!r} must be in (0, 1]")


def sample_next(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids (B,) from logits (B, V): argmax when temperature is 0, else a sample from
    softmax(logits / temperature) restricted to the top_k most likely tokens and to the smallest
    set whose probability reaches top_p (nucleus)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # the mass of the more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # the first token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _decode_loop(
    model,
    input_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    seed: int | None,
    use_cache: bool,
    vocab_size: int | None,
    on_token: Callable[[int, int], bool | None] | None,
) -> tuple[list[list[int]], list[FinishReason]]:
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    rows = [[int(t) for t in row] for row in input_ids]
    if not rows:
        return [], []
    config = model.config
    block = config.block_size
    for i, row in enumerate(rows):
        if not row:
            raise UserError(f"prompt {i} has no tokens; give at least one (e.g. the end-of-text token)")
        if min(row) < 0 or max(row) >= config.vocab_size:
            raise UserError(f"prompt {i} has token ids outside the model's vocabulary of {config.vocab_size}")
        if len(row) >= block:
            raise UserError(
                f"prompt {i} has {len(row)} tokens, which leaves no room to generate in block_size={block}; shorten it"
            )
    limits = [min(max_new_tokens, block - len(row)) for row in rows]
    if any(n < max_new_tokens for n in limits):
        log.warning(
            "generate: max_new_tokens=%d does not fit in block_size=%d after the prompt; stopping at the context end",
            max_new_tokens,
            block,
        )

    device = _device(model)
    B, P = len(rows), max(len(r) for r in rows)
    pad = 0 if eos_id is None else eos_id
    generator = None if seed is None else torch.Generator(device=device).manual_seed(int(seed))
    new: list[list[int]] = [[] for _ in rows]
    reasons: list[FinishReason | None] = [None] * B
    active = [True] * B

    def left_padded(seqs: list[list[int]]) -> tuple[Tensor, Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
        mask = torch.tensor([[False] * (width - len(s)) + [True] * len(s) for s in seqs], device=device)
        return ids, mask

    def full_logits() -> Tensor:
        """Last-position logits of every active row, the whole sequence run again (no cache)."""
        live = [b for b in range(B) if active[b]]
        ids, mask = left_padded([rows[b] + new[b] for b in live])
        position_ids = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
        out = torch.zeros(B, config.vocab_size, device=device)
        out[live] = model(ids, key_padding_mask=mask, position_ids=position_ids)[:, -1].float()
        return out

    was_training = model.training
    model.eval()
    try:
        if use_cache:
            cache = model.new_kv_cache(B, P + max(limits) - 1)
            ids, mask = left_padded(rows)
            logits = model(ids, key_padding_mask=mask, kv_cache=cache)[:, -1].float()
        else:
            logits = full_logits()
        while True:
            if vocab_size is not None and vocab_size < logits.size(-1):
                logits[:, vocab_size:] = float("-inf")
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            for b, tok in enumerate(nxt.tolist()):
                if not active[b]:
                    continue
                if eos_id is not None and tok == eos_id:
                    active[b], reasons[b] = False, "eos"
                    continue
                new[b].append(tok)
                if on_token is not None and on_token(b, tok):
                    active[b], reasons[b] = False, "stop"
                elif len(new[b]) >= limits[b]:
                    active[b], reasons[b] = False, "length"
            if not any(active):
                break
            if use_cache:  # finished rows go on as padding: nothing attends to them
                feed = torch.tensor(active, device=device)[:, None]
                logits = model(nxt[:, None], key_padding_mask=feed, kv_cache=cache)[:, -1].float()
            else:
                logits = full_logits()
    finally:
        model.train(was_training)
    return new, [r or "length" for r in reasons]


def generate_ids(
    model,
    input_ids: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    vocab_size: int | None = None,
    on_token: Callable[[int, int], bool | None] | None = None,
) -> list[list[int]]:
    """The new token ids of each prompt in ``input_ids`` (a list of token id lists), in one left-padded batch.

    A row ends at ``eos_id`` (not included in its ids), after ``max_new_tokens`` or when prompt and
    continuation reach the model's block_size. ``vocab_size`` keeps tokens at or above it from being
    chosen (a model's embedding table is often padded beyond its tokenizer). ``on_token(row, id)`` is
    called for every new token; returning True ends that row.
    """
    new, _ = _decode_loop(
        model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_id, seed, use_cache, vocab_size, on_token
    )
    return new


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of text could still become a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def generate_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    stream: Callable[[int, str], None] | None = None,
) -> list[Completion]:
    """:func:`generate`, with each continuation's token ids and finish reason."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not one string")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise UserError(f"stop strings must be non-empty strings, got {stops!r}")
    bos = getattr(tokenizer, "bos_id", None)
    eos = tokenizer.eos_id
    input_ids = []
    for prompt in prompts:
        ids = list(tokenizer.encode(prompt))
        if bos is not None:
            ids = [bos, *ids]
        input_ids.append(ids or [eos])  # nothing to continue: start a new document, as GPT-2 does

    n = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(n)]
    emitted = [0] * n  # characters already streamed
    finals: list[str | None] = [None] * n

    def emit(row: int, text: str) -> None:
        if stream is not None and len(text) > emitted[row]:
            stream(row, text[emitted[row] :])
            emitted[row] = len(text)

    def on_token(row: int, tok: int) -> bool:
        tokens[row].append(tok)
        clean = tokenizer.decode(tokens[row]).rstrip("\ufffd")  # an unfinished character waits for its bytes
        cut = _first_stop(clean, stops) if stops else None
        if cut is not None:
            finals[row] = clean[:cut]
            emit(row, finals[row])
            return True
        emit(row, clean[: len(clean) - _held_back(clean, stops)])
        return False

    watch = stream is not None or bool(stops)
    new, reasons = _decode_loop(
        model,
        input_ids,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        eos,
        seed,
        use_cache,
        tokenizer.vocab_size,
        on_token if watch else None,
    )
    completions = []
    for row, prompt in enumerate(prompts):
        text = finals[row]
        if text is None:
            text = tokenizer.decode(new[row])
            cut = _first_stop(text, stops) if stops else None
            text = text if cut is None else text[:cut]
        emit(row, text)
        completions.append(Completion(prompt, text, new[row], reasons[row]))
    return completions


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    stream: Callable[[int, str], None] | None = None,
) -> list[str]:
    """The continuation (new text only) of each prompt, all prompts in one left-padded batch.

    Greedy when temperature is 0; otherwise sampling at that temperature among the top_k tokens and
    the top_p probability mass, from a generator seeded with ``seed`` (reproducible). The tokenizer's
    beginning-of-text token is prepended when it has one; an empty prompt starts from end-of-text.
    Each row stops at end-of-text, at the first of the ``stop`` strings to appear in its new text
    (cut off), after max_new_tokens, or when prompt and continuation fill block_size. ``stream(row,
    piece)`` receives the text as it is produced, a piece once it decodes to whole characters (and
    cannot be the start of a stop string); a row's pieces concatenate to its result.
    """
    return [
        c.text
        for c in generate_completions(
            model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p, stop, seed, use_cache, stream
        )
    ]


def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts from a file: one per line, or JSON objects with a "prompt" field per line (.jsonl)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"generate: --prompts-file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        return [line for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"generate: {path} line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f'generate: {path} line {number}: needs a "prompt" string field')
        prompts.append(record["prompt"])
    return prompts
