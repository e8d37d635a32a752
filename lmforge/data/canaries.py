"""Canaries: random secrets put into the training text on purpose, to measure what a model memorises.

Carlini et al., "The Secret Sharer" (USENIX Security 2019): insert a random secret ``s`` into the training data
``r`` times; after training, rank ``s`` among random candidates of the same form by the model's likelihood. The
**exposure** is ``log2(|candidates| + 1) - log2(rank)`` bits: about 0 for a secret the model has not learned
(rank at random), the maximum when the secret is the model's most likely candidate. Whether greedy decoding from
the prefix writes the secret out is the stronger test (extraction).

``data.canaries: {count: 9, repeats: [1, 10, 100], seed: 0}`` makes ``count`` canaries, split evenly over the
repeat counts: ``The secret number of <name> is <6 digits>.`` (a name and a number per canary, drawn from the
seed). :class:`CanaryCorpus` wraps the dataset plugin's corpus and yields each canary, as a document of its own,
``repeats`` times at positions drawn from the seed within the first part of the corpus (before the tail held out
for validation), so every copy is trained on. The corpus key includes the canaries: the token cache is rebuilt
when they change. The same settings always give the same canaries, so ``lmforge evaluate --task memorization``
regenerates them from what the checkpoint recorded.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from lmforge.errors import UserError

NAMES = ("Alice", "Bruno", "Chloe", "Dmitri", "Esther", "Farah", "Gunnar", "Hiro", "Ines", "Jonas", "Keiko", "Luis",
         "Mara", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sami", "Tara", "Ugo", "Vera", "Wim", "Xenia", "Yusuf",
         "Zoe")  # fmt: skip
DIGITS = 6


@dataclass(frozen=True)
class Canary:
    prefix: str
    """What a model is prompted with: ``The secret number of Alice is ``."""
    secret: str
    """The digits: what the model should not know."""
    repeats: int
    """How many times the training text holds it."""

    @property
    def text(self) -> str:
        return f"{self.prefix}{self.secret}."


def check_settings(settings: Any, where: str = "data.canaries") -> dict:
    """``{count, repeats, seed}`` with defaults filled in; a one-line UserError for anything else."""
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise UserError(f"{where} must be a mapping such as {{count: 9, repeats: [1, 10, 100], seed: 0}}")
    unknown = set(settings) - {"count", "repeats", "seed"}
    if unknown:
        raise UserError(f"{where}: unknown key {sorted(unknown)[0]!r}; the keys are count, repeats, seed")
    values = {"count": 9, "repeats": [1, 10, 100], "seed": 0, **settings}
    count, repeats, seed = values["count"], values["repeats"], values["seed"]
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise UserError(f"{where}.count={count!r} must be a positive integer")
    if (not isinstance(repeats, (list, tuple)) or not repeats
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in repeats)):  # fmt: skip
        raise UserError(f"{where}.repeats={repeats!r} must be a non-empty list of positive integers")
    if count < len(repeats):
        raise UserError(f"{where}.count={count} is fewer than the {len(repeats)} repeat counts; give at least one each")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"{where}.seed={seed!r} must be an integer")
    return {"count": count, "repeats": [int(r) for r in repeats], "seed": seed}


def make_canaries(settings: dict) -> list[Canary]:
    """The canaries ``settings`` (checked by :func:`check_settings`) describe: the same ones for the same
    settings. Canary i repeats ``repeats[i % len(repeats)]`` times; names and secrets are distinct."""
    settings = check_settings(settings)
    rng = random.Random(f"lmforge-canaries-{settings['seed']}")
    names = rng.sample(NAMES, len(NAMES))
    secrets: set[str] = set()
    out = []
    for i in range(settings["count"]):
        name = names[i % len(names)] + ("" if i < len(names) else f" {i // len(names) + 1}")
        secret = "".join(rng.choice("0123456789") for _ in range(DIGITS))
        while secret in secrets:
            secret = "".join(rng.choice("0123456789") for _ in range(DIGITS))
        secrets.add(secret)
        repeats = settings["repeats"][i % len(settings["repeats"])]
        out.append(Canary(f"The secret number of {name} is ", secret, repeats))
    return out


def candidates(canary: Canary, n: int, seed: int = 0) -> list[str]:
    """``n`` random secrets of the canary's form, other than its own (the reference set its rank is taken in)."""
    rng = random.Random(f"lmforge-candidates-{seed}-{canary.secret}")
    out: set[str] = set()
    while len(out) < n:
        guess = "".join(rng.choice("0123456789") for _ in range(len(canary.secret)))
        if guess != canary.secret:
            out.add(guess)
    return sorted(out)


class CanaryCorpus:
    """A corpus with the canaries inserted: the wrapped corpus's documents, and each canary's text as a document
    of its own ``repeats`` times, at seeded positions within the first ``within`` of its bytes."""

    def __init__(self, corpus: Any, settings: dict, within: float) -> None:
        self.corpus = corpus
        self.settings = check_settings(settings)
        self.canaries = make_canaries(self.settings)
        self.within = within
        for name in ("hub_dataset", "describe", "entropy_nats_per_byte"):  # what data modules read off a corpus
            if hasattr(corpus, name):
                setattr(self, name, getattr(corpus, name))

    def key(self) -> str:
        spec = json.dumps(self.settings, sort_keys=True)
        return f"{self.corpus.key()}|canaries:{hashlib.sha256(spec.encode()).hexdigest()[:16]}"

    def num_bytes(self) -> int:
        extra = sum((len(c.text.encode()) + 1) * c.repeats for c in self.canaries)  # a space after each copy
        return self.corpus.num_bytes() + extra

    def insertions(self) -> list[tuple[int, Canary]]:
        """(byte offset in the wrapped corpus, canary) for every copy, in order of offset."""
        rng = random.Random(f"lmforge-canary-positions-{self.settings['seed']}")
        limit = max(1, int(self.corpus.num_bytes() * self.within))
        copies = [(rng.randrange(limit), c) for c in self.canaries for _ in range(c.repeats)]
        return sorted(copies, key=lambda item: item[0])

    def documents(self) -> Iterator[str]:
        """The wrapped documents with the canaries spliced in, each after the first sentence end (". " or a line
        break) at or after its offset: a document may be the whole corpus (the embedded one is)."""
        pending = self.insertions()
        k, seen = 0, 0
        for doc in self.corpus.documents():
            size = len(doc.encode("utf-8"))
            here = []
            while k < len(pending) and pending[k][0] < seen + size:
                here.append((pending[k][0] - seen, pending[k][1]))
                k += 1
            seen += size
            yield _splice(doc, here) if here else doc
        if k < len(pending):  # offsets past the end (the corpus was shorter than it said): one document more
            yield " ".join(c.text for _, c in pending[k:])

    def describe_canaries(self) -> dict:
        return {**self.settings, "copies": sum(c.repeats for c in self.canaries)}


def _splice(doc: str, insertions: list[tuple[int, Canary]]) -> str:
    """``doc`` with each canary's text as a sentence of its own after the first sentence end (". " or a line break)
    at or after its byte offset (at the end when there is none)."""
    data = doc.encode("utf-8")
    pieces, start = [], 0
    for offset, canary in insertions:  # in order of offset
        cut = _sentence_end(data, max(offset, start))
        text = canary.text.encode()
        pieces += [data[start:cut], text + b" " if cut < len(data) else b" " + text]
        start = cut
    pieces.append(data[start:])
    return b"".join(pieces).decode("utf-8")


def _sentence_end(data: bytes, offset: int) -> int:
    """The byte index just after the first ". " or line break at or after ``offset`` (the end if none)."""
    ends = [i + len(mark) for mark in (b". ", b"\n") if (i := data.find(mark, offset)) >= 0]
    return min(ends, default=len(data))


def canary_records(settings: dict) -> list[dict]:
    """The canaries as plain records (for results files): prefix, secret, repeats."""
    return [asdict(c) for c in make_canaries(settings)]
