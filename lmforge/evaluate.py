"""Evaluation: multiple-choice accuracy, generation metrics (BLEU, ROUGE, exact match), perplexity and
memorization (the exposure of canaries put into the training text, :func:`memorization`).

Three data tasks, each a function that takes a model, its tokenizer and records, and returns
``{"metrics": {...}, "examples": [...]}`` (the metrics and one result per example, in record order);
:func:`lmforge.commands.evaluate_command` is the ``lmforge evaluate MODEL --task TASK --data FILE`` command
around them.

Multiple choice (:func:`multiple_choice`), as lm-evaluation-harness scores MMLU and HellaSwag
    A record is ``{"question": str, "choices": [str, ...], "answer": int}``; HellaSwag's names are
    accepted too: ``context`` (or ``ctx``) for the question, ``endings`` for the choices, ``label`` for
    the answer. The answer is a 0-based index (an integer, a string of digits such as HellaSwag's
    ``"2"``, or a letter ``"A"``, ``"B"``, ... as MMLU prints them).

    Each choice is scored by the sum of the log-probabilities of its tokens after the question: the
    question and the choice are tokenized *separately* and concatenated, ``[bos] + encode(question) +
    encode(choice)`` (bos only when the tokenizer has one; an empty question with no bos starts from the
    end-of-text token). Nothing is inserted between the two: **a choice carries the space that separates
    it from the question** (``"Subject:"`` + ``" fox"``), as lm-evaluation-harness's ``target_delimiter``
    puts one there. ``acc`` takes the choice with the highest sum; ``acc_norm`` the highest sum divided
    by the choice's length in UTF-8 bytes (the leading space included), which removes the bias towards
    short choices. Log-probabilities are taken in float32, sequences are batched right-padded (padding
    after the last real token changes no earlier position of a causal model). When the context plus the
    longest choice do not fit in ``block_size + 1`` tokens, the question is cut from the left (the bos
    is kept), the same for every choice of the record.

Generation (:func:`generation_metrics`)
    A record is ``{"prompt": str, "completion": str}`` or ``{"prompt": str, "references": [str, ...]}``.
    The model continues each prompt greedily with :func:`lmforge.generate.generate` (until end-of-text,
    a stop string or ``max_new_tokens``); the output is compared with the reference(s):

    - ``bleu``: corpus BLEU-4 (torchmetrics ``BLEUScore``: words split on whitespace, case kept, clipped
      n-gram counts over all references, brevity penalty from the closest reference length). With
      ``smooth=True``, add-one smoothing of the 2- to 4-gram precisions (Lin and Och, 2004). Unsmoothed
      BLEU-4 is 0 for outputs and references shorter than 4 words; smoothing scores them by their
      word matches instead. (torchmetrics returns 0 when any n-gram order has no match even with
      ``smooth=True``; here the smoothing applies exactly where it is meant to.)
    - ``rouge1``, ``rouge2``, ``rougeL``: ROUGE F-measures (torchmetrics ``ROUGEScore``: lower-cased,
      words of letters and digits, no stemming, the best reference per example), averaged over examples.
    - ``exact_match``: the share of outputs equal to a reference after stripping surrounding whitespace.

    Each example also reports its own BLEU and ROUGE values.

Perplexity (:func:`perplexity`)
    Each text is ``[bos or end-of-text] + encode(text)``; every text token is predicted once (the
    first from the start token, as after a document boundary in pretraining), and no end-of-text is
    added at the end. Texts longer than ``block_size`` are scored with sliding windows: each window
    holds ``block_size`` tokens and moves by ``stride``, scoring only its last ``stride`` tokens, so
    every token after the first window sees at least ``block_size - stride`` tokens of context.
    Reports the token-weighted mean ``nll`` (nats per token), ``perplexity = exp(nll)`` and
    ``nats_per_byte`` (total NLL over the texts' UTF-8 bytes, comparable across tokenizers and with the
    embedded corpus's entropy).

Record files are ``.jsonl`` or ``.json`` (read as for fine-tuning, :func:`lmforge.data.records.read_records`);
perplexity also takes a ``.txt`` file (one text) or records with a ``text`` field. A bad record stops
with one line naming the file, the line and the key. Example files: ``configs/data/mc-example.jsonl``
and ``configs/data/gen-example.jsonl`` (sentences of the embedded grammar, as ``configs/data/sft-*.jsonl``).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lmforge.data.sources import CorpusError
from lmforge.errors import MissingFileError, UserError

log = logging.getLogger(__name__)

PREFIX = "evaluate"
TASKS = ("multiple_choice", "generation", "perplexity", "memorization")
NORMALIZE = ("none", "length", "both")
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
QUESTION_KEYS = ("question", "context", "ctx")
CHOICES_KEYS = ("choices", "endings")
ANSWER_KEYS = ("answer", "label")

Normalize = Literal["none", "length", "both"]


# -- records ---------------------------------------------------------------------------------------------


def _where(record: Any, i: int) -> str:
    """Where a record came from: ``file line N`` for a :class:`lmforge.data.records.Record`, else ``record N``."""
    where = getattr(record, "where", None)
    return where if isinstance(where, str) else f"record {i + 1}"


def _data(record: Any, where: str) -> dict:
    data = getattr(record, "data", record)
    if not isinstance(data, dict):
        raise CorpusError(f"{PREFIX}: {where}: a {type(data).__name__}, not an object (a dict of fields)")
    return data


def _line(record: Any) -> int | None:
    return getattr(record, "line", None)


def _fields(data: dict) -> str:
    return ", ".join(repr(k) for k in data) or "none"


def _pick(data: dict, keys: Sequence[str], where: str, what: str) -> tuple[str, Any]:
    for key in keys:
        if key in data:
            return key, data[key]
    names = " or ".join(repr(k) for k in keys)
    raise CorpusError(f"{PREFIX}: {where}: no {names} ({what}); the record has {_fields(data)}")


def _answer_index(value: Any, n: int, key: str, where: str) -> int:
    index = None
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            index = int(text)
        elif len(text) == 1 and "A" <= text <= "Z":
            index = ord(text) - ord("A")
    if index is None:
        raise CorpusError(
            f"{PREFIX}: {where}: {key!r}={value!r} is not a choice index (0-based integer, digits or a letter A-Z)"
        )
    if not 0 <= index < n:
        raise CorpusError(f"{PREFIX}: {where}: {key!r}={value!r} is out of range for {n} choices (0 to {n - 1})")
    return index


@dataclass
class ChoiceRecord:
    """A multiple-choice record after validation."""

    where: str
    line: int | None
    question: str
    choices: list[str]
    answer: int


def choice_records(records: Iterable[Any]) -> list[ChoiceRecord]:
    """Check multiple-choice records (dicts, or :class:`lmforge.data.records.Record` for file and line in errors)."""
    out = []
    for i, record in enumerate(records):
        where = _where(record, i)
        data = _data(record, where)
        qkey, question = _pick(data, QUESTION_KEYS, where, "the question or context")
        if not isinstance(question, str):
            raise CorpusError(f"{PREFIX}: {where}: {qkey!r} is a {type(question).__name__}, not a string")
        ckey, choices = _pick(data, CHOICES_KEYS, where, "a list of the choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise CorpusError(f"{PREFIX}: {where}: {ckey!r} must be a list of at least 2 strings, got {choices!r}")
        for k, choice in enumerate(choices):
            if not isinstance(choice, str) or not choice:
                raise CorpusError(f"{PREFIX}: {where}: {ckey!r}[{k}]={choice!r} must be a non-empty string")
        akey, answer = _pick(data, ANSWER_KEYS, where, "the index of the right choice")
        out.append(
            ChoiceRecord(
                where, _line(record), question, list(choices), _answer_index(answer, len(choices), akey, where)
            )
        )
    if not out:
        raise CorpusError(f"{PREFIX}: no records to evaluate")
    return out


@dataclass
class GenerationRecord:
    """A generation record after validation."""

    where: str
    line: int | None
    prompt: str
    references: list[str]


def generation_records(records: Iterable[Any]) -> list[GenerationRecord]:
    """Check prompt/completion (or prompt/references) records."""
    out = []
    for i, record in enumerate(records):
        where = _where(record, i)
        data = _data(record, where)
        _, prompt = _pick(data, ("prompt",), where, "the text to continue")
        if not isinstance(prompt, str):
            raise CorpusError(f"{PREFIX}: {where}: 'prompt' is a {type(prompt).__name__}, not a string")
        key, value = _pick(data, ("completion", "references"), where, "the reference output")
        if key == "completion":
            if not isinstance(value, str):
                raise CorpusError(f"{PREFIX}: {where}: 'completion' is a {type(value).__name__}, not a string")
            references = [value]
        else:
            if not isinstance(value, list) or not value or not all(isinstance(r, str) for r in value):
                raise CorpusError(f"{PREFIX}: {where}: 'references' must be a non-empty list of strings, got {value!r}")
            references = list(value)
        out.append(GenerationRecord(where, _line(record), prompt, references))
    if not out:
        raise CorpusError(f"{PREFIX}: no records to evaluate")
    return out


def text_records(records: Iterable[Any]) -> list[tuple[str, int | None, str]]:
    """(where, line, text) of records with a ``text`` field, or of plain strings."""
    out = []
    for i, record in enumerate(records):
        if isinstance(record, str):
            out.append((f"text {i + 1}", None, record))
            continue
        where = _where(record, i)
        data = _data(record, where)
        _, text = _pick(data, ("text",), where, "the text to score")
        if not isinstance(text, str):
            raise CorpusError(f"{PREFIX}: {where}: 'text' is a {type(text).__name__}, not a string")
        out.append((where, _line(record), text))
    if not out:
        raise CorpusError(f"{PREFIX}: no texts to evaluate")
    return out


# -- model helpers -----------------------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _block_size(model: nn.Module) -> int | None:
    size = getattr(getattr(model, "config", None), "block_size", None)
    return int(size) if size is not None else None


def _encode(tokenizer, text: str) -> list[int]:
    return [int(i) for i in tokenizer.encode(text)]


def _bos(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_id", None)
    return [] if bos is None else [int(bos)]


def _progress(total: int, desc: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


class _EvalMode:
    """model.eval() and inference mode for a block; the training flag is restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.inference = torch.inference_mode()

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()
        self.inference.__enter__()

    def __exit__(self, *exc) -> None:
        self.inference.__exit__(*exc)
        self.model.train(self.was_training)


def _target_logprobs(
    model: nn.Module,
    rows: Sequence[tuple[list[int], int]],
    pad_id: int,
    device: torch.device,
) -> list[torch.Tensor]:
    """For each (token ids, first scored position) row, the float32 log-probabilities of its tokens from that
    position on, each given the tokens before it. The rows run as one right-padded batch."""
    width = max(len(ids) for ids, _ in rows) - 1
    idx = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, (ids, start) in enumerate(rows):
        n = len(ids) - 1
        idx[b, :n] = torch.tensor(ids[:-1])
        targets[b, :n] = torch.tensor(ids[1:])
        mask[b, start - 1 : n] = True  # position p predicts token p + 1
    logits = model(idx.to(device))
    mask = mask.to(device)
    picked = logits[mask].float().log_softmax(dim=-1)  # (N, V): only the scored positions, in float32
    values = picked.gather(1, targets.to(device)[mask][:, None]).squeeze(1).cpu()
    counts = mask.sum(dim=1).tolist()
    return list(torch.split(values, counts))


# -- multiple choice ---------------------------------------------------------------------------------------


def multiple_choice(
    model: nn.Module,
    tokenizer,
    records: Iterable[Any],
    normalize: Normalize = "both",
    batch_size: int = 16,
    progress: bool = False,
) -> dict:
    """Multiple-choice accuracy by log-likelihood (see the module docstring for the record format).

    Args:
        model: A causal LM: ``model(idx)`` gives logits (B, T, V); its ``config.block_size``, when it has
            one, bounds the context.
        tokenizer: ``encode``, ``eos_id`` and optionally ``bos_id``.
        records: Dicts, or :class:`lmforge.data.records.Record` (errors then name file and line).
        normalize: Which accuracy to report: ``none`` (``acc``: the highest summed log-likelihood),
            ``length`` (``acc_norm``: the highest log-likelihood per byte of the choice) or ``both``.
        batch_size: Sequences (one per choice) per forward pass.
        progress: Show a progress bar on stderr.

    Returns:
        ``metrics``: ``acc`` and/or ``acc_norm``, ``chance`` (the mean of 1 / number of choices),
        ``examples`` and ``truncated`` (records whose question was cut); ``examples``: per record its
        ``answer``, ``pred`` and/or ``pred_norm``, ``correct`` and/or ``correct_norm``, ``loglikelihoods``
        (one per choice) and ``choice_bytes``.
    """
    if normalize not in NORMALIZE:
        raise UserError(f"{PREFIX}: normalize={normalize!r} must be one of {', '.join(NORMALIZE)}")
    if batch_size < 1:
        raise UserError(f"{PREFIX}: batch_size={batch_size} must be positive")
    items = choice_records(records)
    block = _block_size(model)
    bos = _bos(tokenizer)
    requests: list[tuple[list[int], int]] = []  # (ids, first choice position), one per choice
    owners: list[tuple[int, int]] = []  # (record, choice)
    truncated = 0
    for r, item in enumerate(items):
        question = _encode(tokenizer, item.question)
        context = bos + question or [int(tokenizer.eos_id)]
        endings = [_encode(tokenizer, c) for c in item.choices]
        for k, ids in enumerate(endings):
            if not ids:
                raise CorpusError(f"{PREFIX}: {item.where}: choice {k} ({item.choices[k]!r}) encodes to no tokens")
        longest = max(len(ids) for ids in endings)
        if block is not None and len(context) + longest > block + 1:
            keep = block + 1 - longest  # context tokens that fit beside the longest choice
            if keep < max(1, len(bos)):
                k = max(range(len(endings)), key=lambda j: len(endings[j]))
                raise CorpusError(
                    f"{PREFIX}: {item.where}: choice {k} has {longest} tokens, more than the model's "
                    f"block_size={block} leaves after the context; shorten it"
                )
            context = bos + question[len(question) - (keep - len(bos)) :] if keep > len(bos) else bos
            truncated += 1
        for k, ids in enumerate(endings):
            requests.append((context + ids, len(context)))
            owners.append((r, k))

    device = _device(model)
    pad_id = int(tokenizer.eos_id)
    scores = [0.0] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))  # similar lengths share a batch
    with _EvalMode(model), _progress(len(requests), "multiple choice", "choice", progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            values = _target_logprobs(model, [requests[i] for i in batch], pad_id, device)
            for i, lp in zip(batch, values):
                scores[i] = float(lp.sum())
            bar.update(len(batch))

    loglik: list[list[float]] = [[0.0] * len(item.choices) for item in items]
    for (r, k), score in zip(owners, scores):
        loglik[r][k] = score
    examples = []
    hits = hits_norm = 0
    for r, item in enumerate(items):
        lengths = [len(c.encode("utf-8")) for c in item.choices]
        pred = max(range(len(item.choices)), key=lambda k: loglik[r][k])
        pred_norm = max(range(len(item.choices)), key=lambda k: loglik[r][k] / lengths[k])
        hits += pred == item.answer
        hits_norm += pred_norm == item.answer
        example: dict[str, Any] = {"index": r, "line": item.line, "answer": item.answer}
        if normalize in ("none", "both"):
            example.update(pred=pred, correct=pred == item.answer)
        if normalize in ("length", "both"):
            example.update(pred_norm=pred_norm, correct_norm=pred_norm == item.answer)
        example.update(loglikelihoods=loglik[r], choice_bytes=lengths)
        examples.append(example)
    n = len(items)
    metrics: dict[str, Any] = {}
    if normalize in ("none", "both"):
        metrics["acc"] = hits / n
    if normalize in ("length", "both"):
        metrics["acc_norm"] = hits_norm / n
    metrics.update(chance=sum(1 / len(item.choices) for item in items) / n, examples=n, truncated=truncated)
    return {"metrics": metrics, "examples": examples}


# -- generation --------------------------------------------------------------------------------------------


def _bleu_counts(metric, pred: str | Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[list[float], ...]:
    metric.reset()
    metric.update([pred] if isinstance(pred, str) else list(pred), refs)
    return (
        metric.numerator.tolist(),
        metric.denominator.tolist(),
        float(metric.preds_len),
        float(metric.target_len),
    )


def _bleu_value(numerator, denominator, preds_len: float, target_len: float, smooth: bool) -> float:
    """BLEU from clipped n-gram counts, as torchmetrics computes it, but smoothing before the zero check."""
    if preds_len == 0 or numerator[0] == 0:
        return 0.0
    if smooth:  # add-one on the 2- to n-gram precisions (Lin and Och 2004), as torchmetrics' smooth=True
        precisions = [numerator[0] / denominator[0]] + [
            (m + 1) / (d + 1) for m, d in zip(numerator[1:], denominator[1:])
        ]
    else:
        if min(numerator) == 0:
            return 0.0
        precisions = [m / d for m, d in zip(numerator, denominator)]
    geometric = math.exp(sum(math.log(p) for p in precisions) / len(precisions))
    brevity = 1.0 if preds_len > target_len else math.exp(1 - target_len / preds_len)
    return brevity * geometric


def text_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]], smooth: bool = False) -> dict:
    """BLEU-4, ROUGE-1/2/L F-measures and exact match of ``predictions`` against their references.

    ``references[i]`` is the list of acceptable outputs for ``predictions[i]``. Returns ``metrics``
    (corpus BLEU, mean ROUGE F-measures, exact-match rate) and per-example ``examples`` (sentence BLEU
    with the same smoothing, ROUGE F-measures, exact match).
    """
    from torchmetrics.functional.text import rouge_score
    from torchmetrics.text import BLEUScore, ROUGEScore

    if len(predictions) != len(references):
        raise UserError(f"{PREFIX}: {len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise UserError(f"{PREFIX}: no predictions to score")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    bleu = BLEUScore(n_gram=4, smooth=smooth)
    corpus = _bleu_counts(bleu, predictions, refs)
    if smooth:
        corpus_bleu = _bleu_value(*corpus, smooth=True)
    else:
        corpus_bleu = float(bleu.compute())  # torchmetrics' own value
    rouge = ROUGEScore(rouge_keys=ROUGE_KEYS, use_stemmer=False, accumulate="best")
    rouge.update(list(predictions), refs)
    totals = rouge.compute()
    examples = []
    for pred, ref in zip(predictions, refs):
        sentence = rouge_score(pred, [ref], rouge_keys=ROUGE_KEYS, use_stemmer=False, accumulate="best")
        example: dict[str, Any] = {"bleu": _bleu_value(*_bleu_counts(bleu, pred, [ref]), smooth=smooth)}
        example.update({key: float(sentence[f"{key}_fmeasure"]) for key in ROUGE_KEYS})
        example["exact_match"] = any(pred.strip() == r.strip() for r in ref)
        examples.append(example)
    metrics = {"bleu": corpus_bleu}
    metrics.update({key: float(totals[f"{key}_fmeasure"]) for key in ROUGE_KEYS})
    metrics["exact_match"] = sum(e["exact_match"] for e in examples) / len(examples)
    return {"metrics": metrics, "examples": examples}


def generation_metrics(
    model: nn.Module,
    tokenizer,
    records: Iterable[Any],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    smooth: bool = False,
    stop: str | Sequence[str] | None = None,
    progress: bool = False,
) -> dict:
    """Greedy generation for each prompt, scored against its references with :func:`text_metrics`.

    Returns ``metrics`` (``bleu``, ``rouge1``, ``rouge2``, ``rougeL``, ``exact_match``, ``examples``) and
    ``examples``: per record its ``prompt``, ``output``, ``references`` and the per-example metrics.
    """
    from lmforge.generate import generate

    if batch_size < 1:
        raise UserError(f"{PREFIX}: batch_size={batch_size} must be positive")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"{PREFIX}: max_new_tokens={max_new_tokens!r} must be a positive integer")
    items = generation_records(records)
    block = _block_size(model)
    if block is not None:
        bos = _bos(tokenizer)
        for item in items:
            n = len(bos) + len(_encode(tokenizer, item.prompt))
            if n >= block:
                raise CorpusError(
                    f"{PREFIX}: {item.where}: the prompt has {n} tokens, which leaves no room to generate in "
                    f"the model's block_size={block}; shorten it"
                )
    outputs: list[str] = []
    with _EvalMode(model), _progress(len(items), "generation", "prompt", progress) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            outputs += generate(
                model,
                tokenizer,
                [item.prompt for item in batch],
                max_new_tokens=max_new_tokens,
                temperature=0.0,
                stop=stop,
            )
            bar.update(len(batch))
    scored = text_metrics(outputs, [item.references for item in items], smooth=smooth)
    examples = []
    for i, (item, output, values) in enumerate(zip(items, outputs, scored["examples"])):
        examples.append(
            {"index": i, "line": item.line, "prompt": item.prompt, "output": output, "references": item.references}
            | values
        )
    return {"metrics": scored["metrics"] | {"examples": len(items)}, "examples": examples}


# -- perplexity --------------------------------------------------------------------------------------------


def _windows(n: int, block: int, stride: int) -> list[tuple[int, int, int]]:
    """(a, b, first) windows over token positions 0..n-1: the input is ids[a:b] (at most block tokens), it
    predicts positions a+1..b, and positions first..b are the ones it scores (each position 1..n-1 once)."""
    windows = []
    end = 0  # the last position scored
    while end < n - 1:
        b = min(n - 1, block if end == 0 else end + stride)
        a = max(0, b - block)
        windows.append((a, b, end + 1))
        end = b
    return windows


def perplexity(
    model: nn.Module,
    tokenizer,
    texts: Iterable[Any],
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Token-weighted mean negative log-likelihood and perplexity of texts (sliding windows for long ones).

    Args:
        texts: Strings, or records with a ``text`` field (dicts or :class:`lmforge.data.records.Record`).
        block_size: Tokens per window; default (and at most) the model's ``config.block_size``.
        stride: How far a window moves; default ``block_size // 2``. Equal to ``block_size``: disjoint windows.
        batch_size: Windows per forward pass.

    Returns:
        ``metrics``: ``nll`` (nats per token), ``perplexity``, ``nats_per_byte``, ``tokens``, ``bytes``,
        ``examples``; ``examples``: per text its ``tokens``, ``nll`` and ``perplexity`` (None for an empty text).
    """
    items = text_records(texts)
    model_block = _block_size(model)
    block = block_size if block_size is not None else model_block
    if block is None:
        raise UserError(f"{PREFIX}: the model has no config.block_size; give block_size")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise UserError(f"{PREFIX}: block_size={block!r} must be a positive integer")
    if model_block is not None and block > model_block:
        raise UserError(f"{PREFIX}: block_size={block} exceeds the model's block_size={model_block}")
    stride = max(1, block // 2) if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= block:
        raise UserError(f"{PREFIX}: stride={stride!r} must be an integer from 1 to block_size={block}")
    if batch_size < 1:
        raise UserError(f"{PREFIX}: batch_size={batch_size} must be positive")

    start_token = _bos(tokenizer) or [int(tokenizer.eos_id)]
    sequences = [start_token + _encode(tokenizer, text) for _, _, text in items]
    jobs = []  # (text, ids, first scored position within ids)
    for t, ids in enumerate(sequences):
        for a, b, first in _windows(len(ids), block, stride):
            jobs.append((t, ids[a : b + 1], first - a))
    nll = [0.0] * len(items)
    counts = [len(ids) - 1 for ids in sequences]
    device = _device(model)
    order = sorted(range(len(jobs)), key=lambda j: -len(jobs[j][1]))
    with _EvalMode(model), _progress(len(jobs), "perplexity", "window", progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            values = _target_logprobs(model, [(jobs[j][1], jobs[j][2]) for j in batch], int(tokenizer.eos_id), device)
            for j, lp in zip(batch, values):
                nll[jobs[j][0]] -= float(lp.double().sum())
            bar.update(len(batch))
    total_tokens = sum(counts)
    if total_tokens == 0:
        raise UserError(f"{PREFIX}: the texts are empty; there are no tokens to score")
    total_nll = sum(nll)
    total_bytes = sum(len(text.encode("utf-8")) for _, _, text in items)
    mean = total_nll / total_tokens
    examples = []
    for i, ((_, line, _), n, value) in enumerate(zip(items, counts, nll)):
        per = value / n if n else None
        examples.append(
            {"index": i, "line": line, "tokens": n, "nll": per, "perplexity": _exp(per) if per is not None else None}
        )
    metrics = {
        "nll": mean,
        "perplexity": _exp(mean),
        "nats_per_byte": total_nll / total_bytes,
        "tokens": total_tokens,
        "bytes": total_bytes,
        "examples": len(items),
        "block_size": block,
        "stride": stride,
    }
    return {"metrics": metrics, "examples": examples}


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


def read_data(path: str, task: str, bad_lines: str = "error") -> list[Any]:
    """The records of a data file: :class:`lmforge.data.records.Record` items, or one string for a .txt file."""
    from lmforge.data.records import check_file, read_records

    suffixes = (".jsonl", ".json", ".txt") if task == "perplexity" else (".jsonl", ".json")
    file = check_file(
        path,
        PREFIX,
        suffixes,
        f"the {task} task reads a file ending in",
        lambda what: MissingFileError(f"{PREFIX}: --data {path} {what}"),
    )
    if file.suffix.lower() == ".txt":
        return [file.read_text(encoding="utf-8", errors="replace")]
    try:
        return read_records(path, PREFIX, "--data", bad_lines).records
    except CorpusError as err:
        raise CorpusError(str(err).replace("set data.bad_lines: skip", "use --bad-lines skip")) from None


# -- memorization -----------------------------------------------------------------------------------------


def memorization(
    model: nn.Module,
    tokenizer,
    settings: dict,
    num_candidates: int = 1000,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """Exposure (Carlini et al. 2019) and extraction of the canaries ``settings`` describe
    (:mod:`lmforge.data.canaries`; what the training run's ``data.canaries`` recorded).

    For each canary the model scores its secret and ``num_candidates`` random secrets of the same form after the
    canary's prefix (the sum of the log-probabilities of ``secret + "."`` after ``[bos] + prefix``); the rank of
    the true one (1 = the most likely; ties count against it) gives the exposure ``log2(num_candidates + 1) -
    log2(rank)`` in bits. Extraction: greedy decoding from the prefix for as many tokens as the secret has writes
    exactly the secret. Metrics: mean exposure and extraction rate per repeat count, and over all canaries.
    """
    from lmforge.data.canaries import candidates as random_candidates
    from lmforge.data.canaries import make_canaries
    from lmforge.generate import generate_ids

    canaries = make_canaries(settings)
    device = _device(model)
    pad = int(tokenizer.eos_id)
    examples = []
    bar = _progress(len(canaries), "memorization", "canary", progress)
    with _EvalMode(model):
        for canary in canaries:
            prefix = _bos(tokenizer) + _encode(tokenizer, canary.prefix)
            options = [canary.secret, *random_candidates(canary, num_candidates)]
            scores: list[float] = []
            for start in range(0, len(options), batch_size):
                rows = [
                    (prefix + _encode(tokenizer, f"{o}."), len(prefix)) for o in options[start : start + batch_size]
                ]
                scores += [float(v.sum()) for v in _target_logprobs(model, rows, pad, device)]
            true = scores[0]
            rank = 1 + sum(1 for s in scores[1:] if s >= true)
            secret_ids = _encode(tokenizer, canary.secret)
            greedy = generate_ids(model, [prefix], max_new_tokens=len(secret_ids), eos_id=None,
                                  vocab_size=getattr(tokenizer, "vocab_size", None))[0]  # fmt: skip
            examples.append({
                "prefix": canary.prefix, "secret": canary.secret, "repeats": canary.repeats, "rank": rank,
                "candidates": num_candidates, "exposure": math.log2(num_candidates + 1) - math.log2(rank),
                "extracted": greedy == secret_ids, "greedy": tokenizer.decode(greedy), "logprob": true,
            })  # fmt: skip
            bar.update(1)
    bar.close()
    metrics: dict[str, Any] = {"canaries": len(examples), "max_exposure": math.log2(num_candidates + 1)}
    for repeats in sorted({e["repeats"] for e in examples}):
        group = [e for e in examples if e["repeats"] == repeats]
        metrics[f"exposure@{repeats}"] = sum(e["exposure"] for e in group) / len(group)
        metrics[f"extracted@{repeats}"] = sum(e["extracted"] for e in group) / len(group)
    metrics["exposure"] = sum(e["exposure"] for e in examples) / len(examples)
    metrics["extracted"] = sum(e["extracted"] for e in examples) / len(examples)
    return {"metrics": metrics, "examples": examples}
