"""Checking plugins against their protocols: what ``lmforge plugins check DIST`` runs, and what plugin authors
call from their own tests::

    from lmforge.testing import assert_plugin_ok

    def test_plugins_follow_lmforge_protocols():
        assert_plugin_ok("tokenizer", "wordlevel", vocab_size=64)
        assert_plugin_ok("dataset", "csv")  # with the factory's example_args

Each plugin is built by name and run on sample input through the code lmforge itself runs (``plugins.build``,
``checkpoint.torch_load`` with ``weights_only=True``, ``tokenizer_to_dict`` / ``tokenizer_from_dict``,
``save_tokenizer`` / ``load_tokenizer``, ``export.export``), so a plugin that passes here works in a run,
its checkpoints and their exports:

- dataset: the key rule, a key that is the same for two builds with the same arguments, documents that are str
  (read twice, the same), num_bytes an int (and ``describe()`` / ``hub_dataset`` the right types when present);
- tokenizer: its members, encode / encode_batch / decode on sample texts, ids in range, decoding every id, a
  fingerprint stable across builds, and the round trips through a checkpoint and through a folder, encoding
  as before;
- optimizer: steps on a tiny GPT (through ``step(closure)``, as Lightning calls it), a state_dict that loads with
  ``torch.load(weights_only=True)``, and steps after resuming from it equal to uninterrupted ones;
- scheduler: the same with learning rates: state through a weights-only save and load, resumed rates equal;
- filter: name and version strs, process() giving a str or None for each sample document and the same output
  from a second build, stats() plain data (JSON), and, unless the step is ``stateful``, a pickled copy that
  gives the same output (steps run in worker processes);
- exporter: a tiny checkpoint written the way ``lmforge fit`` writes one, exported through ``export.export``
  into a new folder, which must then exist and hold files, with nothing else left beside it (or beside the
  checkpoint).

Sample arguments: a plugin with required arguments (a file to read, say) declares them as an attribute of its
factory, ``example_args``: a dict, or a callable ``(folder: pathlib.Path) -> dict`` that may write sample files
into the empty temporary folder it is given. Arguments passed to :func:`check_plugin` replace them.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge import plugins
from lmforge.errors import UserError
from lmforge.plugins import PluginInfo


@dataclass(frozen=True)
class CheckResult:
    """One check of one plugin."""

    kind: str
    name: str
    check: str
    """What was checked: build, key, documents, checkpoint round trip, resume, ..."""
    ok: bool
    reason: str = ""
    """Why it failed (empty when it passed)."""

    def line(self) -> str:
        text = f"{'PASS' if self.ok else 'FAIL'} {self.kind} {self.name!r}: {self.check}"
        return f"{text}: {self.reason}" if self.reason else text


class CheckFailed(Exception):
    """A check that found the plugin breaking its protocol; the message says what to fix."""


class _Stop(Exception):
    """Ends a plugin's checks after the first failure: later checks need what the failed one built."""


class _Checks:
    """The results of one plugin's checks, run in order until one fails."""

    def __init__(self, kind: str, name: str, info: PluginInfo | None = None) -> None:
        self.kind, self.name, self.info = kind, name, info
        self.results: list[CheckResult] = []

    def run(self, check: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, recorded as ``check``; anything it raises (plugin code may even call sys.exit) fails it."""
        try:
            value = fn(*args)
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # noqa: BLE001 (a check reports whatever the plugin raised)
            self.results.append(CheckResult(self.kind, self.name, check, False, self._reason(err)))
            raise _Stop from None
        self.results.append(CheckResult(self.kind, self.name, check, True))
        return value

    def _reason(self, err: BaseException) -> str:
        if isinstance(err, CheckFailed):
            return str(err)
        if isinstance(err, UserError):
            text = " ".join(str(err).split())
            if self.info is not None:
                text = text.replace(self.info.describe() + " ", "")
            return text
        return plugins.error_text(err)


def _through_weights_only(path: Path, payload: dict, allowed: str) -> dict:
    """``payload`` saved with torch.save and read back as lmforge reads checkpoints (weights only)."""
    import torch

    from lmforge.checkpoint import torch_load

    torch.save(payload, path)
    try:
        return torch_load(path)
    except UserError as err:
        raise CheckFailed(
            f"its state_dict() does not load with torch.load(weights_only=True), as lmforge reads checkpoints "
            f"({err}); keep only {allowed} and plain containers in it"
        ) from None


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise CheckFailed(reason)


# -- sample arguments -------------------------------------------------------------------------------------------


def _example_files(folder: Path) -> dict:
    (folder / "sample.txt").write_text(" ".join(SAMPLE_DOCUMENTS[:20]), encoding="utf-8")
    return {"paths": [str(folder / "sample.txt")]}


def _example_tokenizer_json(folder: Path) -> dict:
    from lmforge.tokenizers import HFTokenizer

    HFTokenizer.train_bpe(SAMPLE_DOCUMENTS, vocab_size=300).save(folder / "tok")
    return {"path": str(folder / "tok")}


BUILTIN_EXAMPLES: dict[tuple[str, str], dict | Callable[[Path], dict]] = {
    ("dataset", "embedded"): {"size_bytes": 20_000},
    ("dataset", "files"): _example_files,
    ("tokenizer", "bpe"): {"vocab_size": 320},
    ("tokenizer", "hf"): _example_tokenizer_json,
}
"""Sample arguments of lmforge's own plugins (kept here, not on the factories, so the library modules stay
free of test code); a third-party plugin declares its own as ``factory.example_args``."""


def example_args(info: PluginInfo, factory: Any, folder: Path) -> dict:
    """The sample arguments of a plugin: its factory's ``example_args`` (a dict, or a callable given ``folder``)."""
    declared = getattr(factory, "example_args", None)
    if declared is None and info.builtin:
        declared = BUILTIN_EXAMPLES.get((info.kind, info.name))
    if declared is None:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    values = declared(folder) if callable(declared) else declared
    _require(
        isinstance(values, dict),
        f"example_args gave {type(values).__name__}; it must be a dict or a callable (folder) -> dict",
    )
    return dict(values)


# -- sample input ------------------------------------------------------------------------------------------------

SAMPLE_DOCUMENTS = [
    f"Document {i}: the {animal} {verb} over the {thing}, {count} times; café, 東京 and 😀 too.\n"
    for i, (animal, verb, thing, count) in enumerate(
        (a, v, t, c)
        for a in ("fox", "dog", "cat", "owl")
        for v in ("jumps", "runs", "looks")
        for t in ("fence", "river", "moon", "hill")
        for c in (1, 2, 3)
    )
]
"""A small corpus in several scripts (144 documents): the sample a tokenizer plugin is built on."""


class SampleCorpus:
    """A corpus (the ``lmforge.datasets`` protocol) of fixed documents, for building tokenizers."""

    def __init__(self, documents: list[str] = SAMPLE_DOCUMENTS, key: str = "lmforge-sample-corpus-v1") -> None:
        self._documents, self._key = list(documents), key

    def key(self) -> str:
        return self._key

    def documents(self) -> Iterator[str]:
        return iter(self._documents)

    def num_bytes(self) -> int:
        return sum(len(d.encode("utf-8")) for d in self._documents)


def tiny_config(vocab_size: int = 320, **options: Any):
    """The GPTConfig of the checks' tiny models (257 byte ids fit in 320 rows)."""
    from lmforge.model import GPTConfig

    return GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32, **options)


def write_checkpoint(path: str | Path, model: Any = None, tokenizer: Any = None, step: int = 1) -> Path:
    """A checkpoint as ``lmforge fit`` writes one (Lightning's keys, lmforge's metadata, ``torch.save``): the
    GPT ``model`` (default: a tiny random one) and ``tokenizer`` (default: bytes), for testing exporters."""
    import torch

    import lmforge
    from lmforge.model import GPT
    from lmforge.tokenizers import ByteTokenizer, tokenizer_to_dict

    if model is None:
        torch.manual_seed(0)
        model = GPT(tiny_config())
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    config = model.config.to_dict()
    checkpoint = {
        "epoch": 0,
        "global_step": step,
        "state_dict": {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()},
        "loops": {},
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"config": config, "optimizer": {"name": "adamw"}, "scheduler": {"name": "cosine"}},
        "lmforge": {
            "version": lmforge.__version__,
            "run": {},
            "schedule_steps": step,
            "data": {},
            "model_config": config,
            "tokenizer": tokenizer_to_dict(tokenizer),
        },
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


# -- the checks, per kind ------------------------------------------------------------------------------------------


def _build(kind: str, name: str, kwargs: dict, *args: Any) -> Any:
    return plugins.build(kind, {"name": name, **kwargs}, *args)


def _check_dataset(c: _Checks, name: str, kwargs: dict, folder: Path) -> None:
    corpus = c.run("build", _build, "dataset", name, kwargs)
    again = c.run("build again", _build, "dataset", name, kwargs)

    def key() -> None:
        first, second = corpus.key(), again.key()
        problem = plugins.corpus_key_problem(first)
        _require(problem is None, problem or "")
        _require(
            first == second,
            f"key() differs between two builds with the same arguments ({first!r}, then {second!r}); "
            "derive it from the content and the arguments only",
        )

    def documents() -> None:
        first = _head(corpus.documents(), "documents()")
        _require(bool(first), "documents() yielded nothing for the sample arguments")
        _require(
            first == _head(corpus.documents(), "documents()"),
            "documents() gave other documents when read again; lmforge reads a corpus more than once",
        )

    def num_bytes() -> None:
        value = corpus.num_bytes()
        _require(isinstance(value, int) and not isinstance(value, bool), f"num_bytes() returned {value!r}, not an int")
        _require(value >= 0, f"num_bytes() returned {value}, a negative size")

    def optional_members() -> None:
        hub = getattr(corpus, "hub_dataset", None)
        _require(hub is None or isinstance(hub, str), f"hub_dataset is {type(hub).__name__}, not a str or None")
        describe = getattr(corpus, "describe", None)
        if describe is not None:
            _require(callable(describe), "describe is not a method")
            text = describe()
            _require(isinstance(text, str), f"describe() returned {type(text).__name__}, not a str")

    c.run("key", key)
    c.run("documents", documents)
    c.run("num_bytes", num_bytes)
    c.run("hub_dataset and describe", optional_members)


def _head(documents: Any, what: str, limit: int = 1000, max_chars: int = 1 << 20) -> list[str]:
    """The first documents (at most ``limit``, or about ``max_chars`` characters), each checked to be a str."""
    head: list[str] = []
    size = 0
    for i, doc in enumerate(documents):
        _require(isinstance(doc, str), f"{what} yielded {type(doc).__name__} as document {i}, not a str")
        head.append(doc)
        size += len(doc)
        if len(head) >= limit or size >= max_chars:
            break
    return head


def _ids(value: Any, vocab_size: int, what: str) -> list[int]:
    """``value`` as a list of ints, each checked to be an integer (Python or NumPy) in range."""
    import numpy as np

    _require(hasattr(value, "__len__"), f"{what} returned {type(value).__name__}, not a sequence of ints")
    ids = list(value)
    for i in ids:
        _require(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool),
            f"{what} returned {type(i).__name__} ids, not ints",
        )
        _require(0 <= int(i) < vocab_size, f"{what} returned the id {int(i)}, outside 0..vocab_size-1 ({vocab_size})")
    return [int(i) for i in ids]


def _check_tokenizer(c: _Checks, name: str, kwargs: dict, folder: Path) -> None:
    from lmforge.checkpoint import torch_load
    from lmforge.tokenizers import SAMPLE_TEXTS, load_tokenizer, save_tokenizer, tokenizer_from_dict, tokenizers_differ
    from lmforge.tokenizers import tokenizer_to_dict as to_dict

    corpus = SampleCorpus()
    cache = folder / "cache"
    tok = c.run("build", _build, "tokenizer", name, kwargs, corpus, cache)
    texts = [*SAMPLE_TEXTS, *SAMPLE_DOCUMENTS[:3]]

    def members() -> None:
        size, eos = tok.vocab_size, tok.eos_id
        _require(isinstance(size, int) and not isinstance(size, bool) and size > 0, f"vocab_size is {size!r}")
        _require(isinstance(eos, int) and not isinstance(eos, bool), f"eos_id is {eos!r}, not an int")
        _require(0 <= eos < size, f"eos_id={eos} is outside 0..vocab_size-1 ({size})")

    def encode() -> None:
        for text in texts:
            ids = tok.encode(text)
            _require(isinstance(ids, list), f"encode({text[:20]!r}) returned a {type(ids).__name__}, not a list")
            _ids(ids, tok.vocab_size, f"encode({text[:20]!r})")

    def encode_batch() -> None:
        batch = list(tok.encode_batch(list(texts)))
        _require(len(batch) == len(texts), f"encode_batch of {len(texts)} texts returned {len(batch)} sequences")
        for text, ids in zip(texts, batch):
            got = _ids(ids, tok.vocab_size, "encode_batch")
            _require(got == list(tok.encode(text)), f"encode_batch encodes {text[:20]!r} other than encode does")

    def decode() -> None:
        for text in texts:
            out = tok.decode(tok.encode(text))
            _require(isinstance(out, str), f"decode returned {type(out).__name__}, not a str")
        every = tok.decode(list(range(tok.vocab_size)))  # generation may produce any id, eos included
        _require(isinstance(every, str), f"decode of every id returned {type(every).__name__}, not a str")

    def fingerprint() -> None:
        value = tok.fingerprint()
        _require(isinstance(value, str) and value, f"fingerprint() returned {value!r}, not a non-empty str")
        other = _build("tokenizer", name, kwargs, SampleCorpus(), cache).fingerprint()
        _require(
            other == value,
            f"fingerprint() differs between two builds on the same corpus ({value!r}, then {other!r}); "
            "the token cache is keyed by it",
        )

    def checkpoint() -> None:
        import torch

        path = folder / "tokenizer.ckpt"
        torch.save({"lmforge": {"tokenizer": to_dict(tok)}}, path)
        rebuilt = tokenizer_from_dict(torch_load(path)["lmforge"]["tokenizer"])
        problem = tokenizers_differ(tok, rebuilt, "the tokenizer restored from a checkpoint", texts)
        _require(problem is None, problem or "")

    def saved_folder() -> None:
        save_tokenizer(tok, folder / "saved")
        problem = tokenizers_differ(
            tok, load_tokenizer(folder / "saved"), "the tokenizer loaded from its folder", texts
        )
        _require(problem is None, problem or "")

    c.run("members", members)
    c.run("encode", encode)
    c.run("encode_batch", encode_batch)
    c.run("decode", decode)
    c.run("fingerprint", fingerprint)
    c.run("checkpoint round trip", checkpoint)
    c.run("folder round trip", saved_folder)


def _batches(vocab_size: int, n: int, seed: int = 0) -> list[tuple[Any, Any]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab_size, (n, 4, 17), generator=gen)
    return [(b[:, :-1], b[:, 1:]) for b in x]


def _train(model: Any, optimizer: Any, batches: list) -> list[float]:
    """Steps as Lightning takes them: zero_grad, then ``step(closure)`` with the forward and backward inside."""
    losses = []
    for x, y in batches:
        optimizer.zero_grad()

        def closure(x=x, y=y):
            loss = model(x, y)
            loss.backward()
            losses.append(loss.item())
            return loss

        optimizer.step(closure)
    _require(
        len(losses) == len(batches),
        "step(closure) did not call the closure: Lightning passes the forward and backward in it",
    )
    _require(all(math.isfinite(v) for v in losses), f"the loss became {losses[-1]} in the sample steps")
    return losses


def _check_optimizer(c: _Checks, name: str, kwargs: dict, folder: Path) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads, and busy-waiting ones slow a loaded machine
    try:
        _optimizer_checks(c, name, kwargs, folder)
    finally:
        torch.set_num_threads(threads)


def _optimizer_checks(c: _Checks, name: str, kwargs: dict, folder: Path) -> None:
    import torch

    from lmforge.model import GPT

    config = tiny_config(64, attention="torch", loss="torch")  # the CPU paths, without the fallback notices
    torch.manual_seed(0)
    model = GPT(config)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = c.run("build", _build, "optimizer", name, kwargs, model)
    batches = _batches(config.vocab_size, 5)
    _train_mode(optimizer)

    def steps() -> None:
        _train(model, optimizer, batches[:3])
        _require(
            any(not torch.equal(start[k], v) for k, v in model.state_dict().items()),
            "three steps left every parameter as it was",
        )

    def state() -> dict:
        payload = {"optimizer": optimizer.state_dict(), "model": model.state_dict()}
        return _through_weights_only(folder / "optimizer.ckpt", payload, "tensors, numbers, strings")

    def resume(saved: dict) -> None:
        torch.manual_seed(0)
        resumed_model = GPT(config)
        resumed_model.load_state_dict(saved["model"])
        resumed = _build("optimizer", name, kwargs, resumed_model)
        _train_mode(resumed)
        resumed.load_state_dict(saved["optimizer"])
        _train(model, optimizer, batches[3:])
        _train(resumed_model, resumed, batches[3:])
        for key, value in model.state_dict().items():
            other = resumed_model.state_dict()[key]
            if not torch.allclose(value, other, rtol=1e-5, atol=1e-7):
                diff = (value - other).abs().max().item()
                raise CheckFailed(
                    f"after resuming from its state_dict, two steps give other weights than uninterrupted ones "
                    f"({key} differs by {diff:.3g}); save everything step() uses in state_dict()"
                )

    c.run("steps", steps)
    saved = c.run("state_dict weights-only", state)
    c.run("resume", resume, saved)


def _train_mode(optimizer: Any) -> None:
    """Schedule-free optimizers have train()/eval() modes; lmforge switches them as the module's mode changes."""
    switch = getattr(optimizer, "train", None)
    if callable(switch):
        switch()


def _check_scheduler(c: _Checks, name: str, kwargs: dict, folder: Path) -> None:
    import torch


    total = 40

    def make() -> tuple[Any, Any]:
        param = torch.nn.Parameter(torch.zeros(2))
        optimizer = torch.optim.SGD([param], lr=0.1)
        return optimizer, _build("scheduler", name, kwargs, optimizer, total)

    optimizer, scheduler = c.run("build", make)

    def run(optimizer: Any, scheduler: Any, n: int) -> list[float]:
        rates = []
        for _ in range(n):
            optimizer.step()
            scheduler.step()
            rates.append(float(optimizer.param_groups[0]["lr"]))
        return rates

    def protocol() -> None:
        _require(
            isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler),
            f"it returned {type(scheduler).__name__}, not a torch.optim.lr_scheduler.LRScheduler",
        )
        rates = run(optimizer, scheduler, 10)
        _require(all(math.isfinite(r) and r >= 0 for r in rates), f"learning rates {rates} are not all finite and >= 0")

    def state() -> dict:
        payload = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        return _through_weights_only(folder / "scheduler.ckpt", payload, "numbers, strings")

    def resume(saved: dict) -> None:
        optimizer2, scheduler2 = make()
        optimizer2.load_state_dict(saved["optimizer"])
        scheduler2.load_state_dict(saved["scheduler"])
        expected, got = run(optimizer, scheduler, 10), run(optimizer2, scheduler2, 10)
        for step, (a, b) in enumerate(zip(expected, got), start=11):
            _require(
                math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12),
                f"after resuming from its state_dict, step {step} has lr {b:.6g} instead of {a:.6g}",
            )

    c.run("steps", protocol)
    saved = c.run("state_dict weights-only", state)
    c.run("resume", resume, saved)


def _check_exporter(c: _Checks, name: str, kwargs: dict, folder: Path) -> None:
    from lmforge.export import export

    checkpoint = c.run("tiny checkpoint", write_checkpoint, folder / "run" / "tiny.ckpt")
    parent = folder / "exports"
    parent.mkdir()
    out = parent / "tiny-export"
    c.run("export", lambda: export(checkpoint, out, name, **kwargs))

    def result() -> None:
        _require(out.is_dir(), f"{out.name} is not a folder after the export")
        _require(any(p.is_file() for p in out.rglob("*")), f"{out.name} holds no file")
        beside = sorted(p.name for p in parent.iterdir() if p.name != out.name)
        _require(not beside, f"the export left {', '.join(beside)} beside {out.name}; write only into out_dir")
        written = sorted(p.name for p in checkpoint.parent.iterdir() if p != checkpoint)
        _require(not written, f"the export wrote {', '.join(written)} beside the checkpoint; write only into out_dir")

    c.run("folder", result)


def _check_filter(c: _Checks, name: str, kwargs: dict, folder: Path) -> None:
    import json
    import pickle

    step = c.run("build", _build, "filter", name, kwargs)
    docs = [*SAMPLE_DOCUMENTS[:40], SAMPLE_DOCUMENTS[0], " ".join(SAMPLE_DOCUMENTS[:12])]

    def members() -> None:
        for member in ("name", "version"):
            value = getattr(step, member)
            _require(isinstance(value, str) and value, f"{member} is {value!r}, not a non-empty str")

    def run(s: Any) -> list[str | None]:
        out = []
        for i, doc in enumerate(docs):
            result = s.process(doc)
            _require(result is None or isinstance(result, str),
                     f"process() returned {type(result).__name__} for document {i}, not a str or None")  # fmt: skip
            out.append(result)
        return out

    def same_again() -> None:
        first = run(step)
        _require(first == run(_build("filter", name, kwargs)),
                 "a second build gave other output for the same documents; depend on the options only")  # fmt: skip

    def stats() -> None:
        value = step.stats()
        _require(isinstance(value, dict), f"stats() returned {type(value).__name__}, not a dict")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as err:
            raise CheckFailed(f"stats() is not plain data ({err}); use ints, floats, strs, lists and dicts") from None

    def picklable() -> None:
        if getattr(step, "stateful", False):
            return
        fresh = _build("filter", name, kwargs)
        try:
            copy = pickle.loads(pickle.dumps(fresh))
        except Exception as err:
            raise CheckFailed(
                f"it does not pickle ({plugins.error_text(err)}); a step that is not stateful runs in worker "
                "processes, or set stateful = True on it"
            ) from None
        _require(run(copy) == run(_build("filter", name, kwargs)), "a pickled copy gives other output")

    c.run("members", members)
    c.run("process", same_again)
    c.run("stats", stats)
    c.run("pickle", picklable)


CHECKS: dict[str, Callable[[_Checks, str, dict, Path], None]] = {
    "dataset": _check_dataset,
    "tokenizer": _check_tokenizer,
    "optimizer": _check_optimizer,
    "scheduler": _check_scheduler,
    "exporter": _check_exporter,
    "filter": _check_filter,
}


# -- the entry points ----------------------------------------------------------------------------------------------


def check_plugin(kind: str, name: str, /, **kwargs: Any) -> list[CheckResult]:
    """Run the installed plugin ``name`` of ``kind`` through its protocol; every check it passed, up to the first
    that failed (with the reason). ``kwargs`` are its arguments; by default its ``example_args``."""
    c = _Checks(kind, name)
    with tempfile.TemporaryDirectory(prefix="lmforge-check-") as tmp:
        folder = Path(tmp)
        try:
            factory = c.run("load", _load, c, kind, name)
            args = dict(kwargs) if kwargs else c.run("example_args", example_args, c.info, factory, folder / "example")
            c.run("arguments", _arguments, kind, name, factory, args)
            (folder / "work").mkdir()
            CHECKS[kind](c, name, args, folder / "work")
        except _Stop:
            pass
    return c.results


def _load(c: _Checks, kind: str, name: str) -> Any:
    c.info = plugins.find(kind, name)
    factory = plugins.load(c.info)
    plugins.check_factory(c.info, factory)
    return factory


def _arguments(kind: str, name: str, factory: Any, args: dict) -> None:
    try:
        plugins.check_kwargs(kind, name, factory, args)
    except plugins.PluginError as err:
        if "needs the argument" not in str(err):
            raise
        raise CheckFailed(
            f"{err}; declare sample arguments as {getattr(factory, '__name__', 'the factory')}.example_args "
            "(a dict, or a callable (folder) -> dict), or pass them"
        ) from None


def assert_plugin_ok(kind: str, name: str, /, **kwargs: Any) -> list[CheckResult]:
    """:func:`check_plugin`, raising AssertionError with the failed check's line when one fails (for pytest)."""
    results = check_plugin(kind, name, **kwargs)
    failed = [r for r in results if not r.ok]
    if failed:
        raise AssertionError("\n".join(r.line() for r in failed))
    return results


def distribution_plugins(distribution: str) -> tuple[str, str, list[PluginInfo]]:
    """(name, version, entry points in lmforge's groups) of an installed distribution; one-line errors."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import distribution as find_distribution

    groups = {g.name: g.kind for g in plugins.GROUPS.values()}
    try:
        dist = find_distribution(distribution)
    except PackageNotFoundError:
        known = sorted({i.distribution for kind in plugins.GROUPS for c in plugins.discover(kind).values() for i in c})
        raise UserError(
            f"plugins check: no installed distribution {distribution!r}; distributions with lmforge plugins: "
            f"{', '.join(known)}"
        ) from None
    name, version = dist.metadata["Name"], dist.version
    if name != plugins.HOST_DISTRIBUTION and not plugins.autoload_enabled():
        raise UserError(
            f"plugins check: third-party plugins are off ({plugins.AUTOLOAD_ENV}); unset it to check {name}"
        )
    infos = [
        PluginInfo(groups[ep.group], ep.name, ep.value, name, version) for ep in dist.entry_points if ep.group in groups
    ]
    if not infos:
        raise UserError(
            f"plugins check: {name} {version} declares no lmforge plugin (no entry point in {', '.join(groups)})"
        )
    order = list(plugins.GROUPS)
    return name, version, sorted(infos, key=lambda i: (order.index(i.kind), i.name))


def check_distribution(distribution: str) -> list[tuple[PluginInfo, list[CheckResult]]]:
    """:func:`check_plugin` for every lmforge entry point of the installed ``distribution``."""
    _, _, infos = distribution_plugins(distribution)
    return [(info, check_plugin(info.kind, info.name)) for info in infos]


def summary_line(info: PluginInfo, results: list[CheckResult]) -> str:
    """``PASS lmforge.tokenizers wordlevel: build, members, ...`` or ``FAIL ...: <check>: <reason>``."""
    group = plugins.GROUPS[info.kind].name
    failed = [r for r in results if not r.ok]
    if failed:
        return f"FAIL {group} {info.name}: {failed[0].check}: {failed[0].reason}"
    checks = [r.check for r in results if r.check not in ("load", "example_args", "arguments")]
    return f"PASS {group} {info.name}: {', '.join(dict.fromkeys(checks))}"
