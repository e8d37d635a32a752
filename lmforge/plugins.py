"""Plugins: named factories found through Python entry points, lmforge's own included.

A distribution adds a plugin by declaring an entry point in one of the groups below::

    [project.entry-points."lmforge.optimizers"]
    lion = "lmforge_lion:build_lion"

and every lmforge user can then write ``optimizer: {name: lion, lr: 3e-4}`` in a config. lmforge's
built-ins are declared the same way in its own pyproject.toml: there is no private side door. What
each group's factory takes and returns is written out in plugins/README.md (and :data:`GROUPS`);
``lmforge plugins check DIST`` (:mod:`lmforge.testing`) runs a distribution's plugins through it.

Discovery is lazy: reading the entry-point table imports nothing (``lmforge plugins`` lists it from
the metadata alone); a plugin's module is imported only when the plugin is used, checked, or
``lmforge plugins --load`` loads it. A plugin that fails to import, whatever it raises (``sys.exit()``
included), or that breaks its group's protocol is reported with its name, distribution, version and
error, and never breaks the rest of lmforge. Two distributions claiming one name is an error naming
both. ``LMFORGE_DISABLE_PLUGIN_AUTOLOAD=1`` (or the config key ``plugin_autoload: false``) hides every
plugin that lmforge itself does not ship.

Arguments are checked before anything runs: by name against the factory's signature, and by type against
its annotations (:func:`check_kwargs`), so ``lr: [1, 2]`` is one line naming the key, not a TypeError
deep in training. What a factory returns is checked when it is built (:func:`build`): the group's
members, a dataset's ``key()`` (it names cache files), a tokenizer's round trip through checkpoints, a filter's
name, version, process and stats.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import PurePath
from typing import Any

from lmforge.errors import UserError

HOST_DISTRIBUTION = "lmforge"
AUTOLOAD_ENV = "LMFORGE_DISABLE_PLUGIN_AUTOLOAD"

# Set from the config key ``plugin_autoload``; None defers to the environment variable.
autoload_override: bool | None = None


class PluginError(UserError):
    """A plugin that cannot be found, loaded, validated or called with the given arguments."""


@dataclass(frozen=True)
class Group:
    """An entry-point group and the protocol its plugins follow."""

    name: str
    kind: str
    protocol: str
    required_params: tuple[str, ...]
    """Positional parameters the factory must accept before its keyword arguments."""
    check: str | None = None
    """``module:function`` that takes what a factory built and returns what is wrong with it (None: nothing),
    named as entry points name their targets and imported only when such a plugin is built: the registry
    knows the kinds' protocols without importing the modules that define them."""


GROUPS: dict[str, Group] = {
    g.kind: g
    for g in (
        Group(
            "lmforge.datasets",
            "dataset",
            "a callable (**kwargs) -> Corpus: an object with key() -> str (letters, digits, '.', '_' and '-', "
            "at most 128; it changes when the content does), documents() -> Iterator[str] and "
            "num_bytes() -> int (an estimate, for progress bars)",
            (),
        ),
        Group(
            "lmforge.tokenizers",
            "tokenizer",
            "a callable (corpus, cache_dir, **kwargs) -> Tokenizer: vocab_size, eos_id, encode, encode_batch, "
            "decode, fingerprint, to_dict and save, and a from_dict classmethod on its class "
            "(see lmforge.tokenizers.Tokenizer)",
            ("corpus", "cache_dir"),
            check="lmforge.tokenizers:round_trip_problem",
        ),
        Group(
            "lmforge.optimizers",
            "optimizer",
            "a callable (model, **kwargs) -> torch.optim.Optimizer; the model is the nn.Module to train, "
            "so the factory chooses parameter groups (weight decay, Muon for matrices, ...)",
            ("model",),
        ),
        Group(
            "lmforge.schedulers",
            "scheduler",
            "a callable (optimizer, total_steps, **kwargs) -> torch.optim.lr_scheduler.LRScheduler, "
            "stepped once per optimizer step",
            ("optimizer", "total_steps"),
        ),
        Group(
            "lmforge.exporters",
            "exporter",
            "a callable (checkpoint, out_dir, **kwargs): reads the lmforge checkpoint file (with "
            "lmforge.checkpoint.load_checkpoint) and writes the export into out_dir, an empty folder lmforge "
            "created and renames when the exporter returns",
            ("checkpoint", "out_dir"),
        ),
        Group(
            "lmforge.filters",
            "filter",
            "a callable (**options) -> a step of data.pipeline: name and version (str; a new version rebuilds "
            "the token cache), process(doc: str) -> str | None (None drops the document) and stats() -> dict "
            "(docs_in, docs_out, bytes_in, bytes_out, dropped by reason, and its own counts); picklable unless "
            "its stateful attribute is true (see lmforge.data.filters)",
            (),
        ),
    )
}

# Checks of what a factory returned, per kind: (test, what is missing when it fails).
TOKENIZER_MEMBERS = ("vocab_size", "eos_id", "encode", "encode_batch", "decode", "fingerprint", "to_dict", "save")
CORPUS_MEMBERS = ("key", "documents", "num_bytes")
FILTER_MEMBERS = ("name", "version", "process", "stats")
CORPUS_KEY = re.compile(r"[A-Za-z0-9._-]{1,128}")
"""What a corpus key may be: it ends up in cache file and folder names (``bpe-{key}-...``)."""


@dataclass(frozen=True)
class PluginInfo:
    """One entry point, before (or without) importing it."""

    kind: str
    name: str
    value: str
    distribution: str
    version: str

    @property
    def builtin(self) -> bool:
        return self.distribution == HOST_DISTRIBUTION

    @property
    def package(self) -> str:
        """The top-level package of the entry point's target (``lmforge_lion`` for ``lmforge_lion.opt:lion``)."""
        return self.value.partition(":")[0].strip().split(".")[0]

    def describe(self) -> str:
        return f"{self.kind} plugin {self.name!r} ({self.value}) from {self.distribution} {self.version}"


def autoload_enabled() -> bool:
    if autoload_override is not None:
        return autoload_override
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def _group(kind: str) -> Group:
    if kind not in GROUPS:
        raise PluginError(f"unknown plugin kind {kind!r}; one of {', '.join(GROUPS)}")
    return GROUPS[kind]


def discover(kind: str) -> dict[str, list[PluginInfo]]:
    """Every entry point of ``kind`` by name (several when distributions clash); imports nothing."""
    found: dict[str, list[PluginInfo]] = {}
    include_third_party = autoload_enabled()
    for ep in entry_points(group=_group(kind).name):
        dist = getattr(ep, "dist", None)
        info = PluginInfo(kind, ep.name, ep.value, dist.name if dist else "?", dist.version if dist else "?")
        if info.builtin or include_third_party:
            entries = found.setdefault(ep.name, [])
            if info not in entries:  # the same distribution seen twice on sys.path is not a clash
                entries.append(info)
    return found


def names(kind: str) -> list[str]:
    return sorted(discover(kind))


def packages(kind: str) -> dict[str, PluginInfo]:
    """The top-level packages of the installed (and allowed) plugins of ``kind``, each with one of its entry
    points: what a checkpoint may name a class from (a plugin tokenizer's, :func:`lmforge.tokenizers.tokenizer_from_dict`)."""
    return {info.package: info for claims in discover(kind).values() for info in claims}


def find(kind: str, name: str) -> PluginInfo:
    """The entry point for ``name``; a clear error when it is unknown or claimed twice."""
    found = discover(kind)
    if name not in found:
        available = sorted(found)
        close = difflib.get_close_matches(name, available, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        off = "" if autoload_enabled() else f" (third-party plugins are off: {AUTOLOAD_ENV} or plugin_autoload)"
        raise PluginError(f"unknown {kind} {name!r}{hint} Available: {', '.join(available) or 'none'}{off}")
    claims = found[name]
    if len(claims) > 1:
        who = " and ".join(f"{c.distribution} {c.version} ({c.value})" for c in claims)
        raise PluginError(f"{kind} name {name!r} is claimed by two distributions: {who}; uninstall one of them")
    return claims[0]


def error_text(err: BaseException) -> str:
    """An exception raised by plugin code as one short line: ``Type: message`` (``sys.exit(3)`` for SystemExit)."""
    if isinstance(err, SystemExit):
        return f"SystemExit: it called sys.exit({err.code!r})"
    message = " ".join(str(err).split())
    if len(message) > 300:
        message = message[:297] + "..."
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def import_target(value: str) -> Any:
    """The object an entry point (``module:attr.attr``) names. Whatever importing it raises propagates."""
    module_name, _, attr = value.partition(":")
    obj = importlib.import_module(module_name.strip())
    for part in attr.strip().split(".") if attr.strip() else ():
        obj = getattr(obj, part)
    return obj


def load(info: PluginInfo) -> Any:
    """Import the factory of ``info``. Anything its import raises, ``SystemExit`` from a ``sys.exit()`` at import
    time included, becomes one PluginError naming the plugin: a broken plugin never ends lmforge. Ctrl-C
    (KeyboardInterrupt) still stops it."""
    try:
        return import_target(info.value)
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 (a plugin's SystemExit or odd BaseException must not end lmforge)
        raise PluginError(f"{info.describe()} failed to load: {error_text(err)}") from err


def check_factory(info: PluginInfo, obj: Any) -> None:
    """Raise PluginError naming the first protocol requirement ``obj`` misses."""
    group = _group(info.kind)
    if not callable(obj):
        raise PluginError(
            f"{info.describe()} breaks the protocol: it is not callable; a {info.kind} plugin is {group.protocol}"
        )
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        return  # builtins without a signature: checked when called
    # the group's fixed arguments are passed positionally: the factory needs that many required positionals
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    has_varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    if len(positional) < len(group.required_params) and not has_varargs:
        missing = group.required_params[len(positional)]
        raise PluginError(
            f"{info.describe()} breaks the protocol: it takes no {missing!r} parameter; "
            f"a {info.kind} plugin is {group.protocol}"
        )


def check_kwargs(kind: str, name: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Raise PluginError when ``kwargs`` do not fit the factory's signature, before anything runs: an unknown
    or missing argument, or a value that does not fit the parameter's annotation (:func:`type_problem`)."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return
    options = params[len(_group(kind).required_params) :]
    named = {p.name: p for p in options if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind == p.VAR_KEYWORD for p in options):
        for key in kwargs:
            if key not in named:
                close = difflib.get_close_matches(key, list(named), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"it accepts {', '.join(named) or 'no arguments'}"
                raise PluginError(f"{kind} {name!r} has no argument {key!r}; {hint}")
    for param in named.values():
        if param.default is param.empty and param.name not in kwargs:
            raise PluginError(f"{kind} {name!r} needs the argument {param.name!r}")
    hints = _annotations(factory, [p for p in named.values() if p.name in kwargs])
    for key, annotation in hints.items():
        value = kwargs[key]
        if value is None and named[key].default is None:
            continue  # ``x: int = None``: None is the default, so it is a value the factory takes
        expected = type_problem(value, annotation)
        if expected:
            raise PluginError(f"{kind} {name!r}: {key}={value!r} is not {expected}{_yaml_hint(value, annotation)}")


def _annotations(factory: Callable[..., Any], params: list[inspect.Parameter]) -> dict[str, Any]:
    """The resolved annotations of ``params`` (string annotations of ``from __future__ import annotations``
    evaluated as typing.get_type_hints does); unannotated or unresolvable parameters are left out."""
    target: Any = factory
    if isinstance(factory, type):
        target = factory.__init__
    elif not (inspect.isfunction(factory) or inspect.ismethod(factory)):
        target = getattr(factory, "func", None) or type(factory).__call__  # a functools.partial, a callable object
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # one name that does not resolve: resolve the others one by one
        hints = {}
        namespace = getattr(inspect.unwrap(target), "__globals__", {})
        for p in params:
            annotation = p.annotation
            if isinstance(annotation, str):
                try:
                    annotation = eval(annotation, dict(namespace))  # what get_type_hints does, per name
                except Exception:
                    continue
            hints[p.name] = annotation
    wanted = {p.name for p in params if p.annotation is not p.empty}
    return {k: v for k, v in hints.items() if k in wanted and not isinstance(v, str)}


_UNION_TYPES = (typing.Union, types.UnionType) if hasattr(types, "UnionType") else (typing.Union,)
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def type_problem(value: Any, annotation: Any) -> str | None:
    """None when ``value`` (as YAML or Python gives it) fits ``annotation``, else what was expected ("an int").

    Understood: int, float (an int is accepted), bool (never taken for a number), str, pathlib paths (a str is
    accepted), None, Optional/Union/``X | None``, Literal, list[X], tuple[X, ...] and tuple[X, Y] (a list is
    accepted, as YAML has no tuples), dict[K, V] and Any. Anything else passes: the factory checks it itself.
    """
    return None if _fits(value, annotation) else describe_type(annotation)


def _fits(value: Any, tp: Any) -> bool:
    if tp is Any or tp is object or tp is inspect.Parameter.empty:
        return True
    if tp is None or tp is type(None):
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNION_TYPES:
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is typing.Annotated:
        return _fits(value, args[0])
    if tp is list or origin is list:
        return isinstance(value, (list, tuple)) and (not args or all(_fits(v, args[0]) for v in value))
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if not args:
            return True
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        if args == ((),):
            return len(value) == 0
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if origin is not None:
        return True  # another generic (Sequence[int], ...): the factory checks the value itself
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return isinstance(value, (str, PurePath))
    return True  # an annotation lmforge does not know: the factory checks the value itself


def describe_type(tp: Any) -> str:
    """``tp`` as the words of an error message: "an int", "a float or null", "one of 'a', 'b'", "a list of str"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNION_TYPES:
        parts = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(parts + (["null"] if type(None) in args else []))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is typing.Annotated:
        return describe_type(args[0])
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return f"a list of {_type_name(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if origin is dict and args:
        return f"a dict of {_type_name(args[0])} to {_type_name(args[1])}"
    words = {int: "an int", float: "a float", bool: "a bool", str: "a str", list: "a list", tuple: "a list",
             dict: "a dict", type(None): "null", None: "null"}  # fmt: skip
    if origin is None and tp in words:
        return words[tp]
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return "a path"
    return f"a {_type_name(tp)}"


def _type_name(tp: Any) -> str:
    if tp is type(None) or tp is None:
        return "null"
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "").replace("pathlib.", "").replace("NoneType", "None")


def _yaml_hint(value: Any, annotation: Any) -> str:
    """YAML (1.1, as PyYAML reads ``--arg``) takes ``3e-4`` for a string: say so when a number was meant."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()) and _fits(1.5, annotation):
        return f" (YAML reads {value} as a string: write it with a dot and a signed exponent, e.g. 3.0e-4)"
    return ""


def split_spec(kind: str, spec: dict[str, Any] | str) -> tuple[str, dict[str, Any]]:
    """``{name: x, **kwargs}`` (or just ``"x"``) -> (name, kwargs)."""
    if isinstance(spec, str):
        return spec, {}
    if not isinstance(spec, dict) or "name" not in spec:
        raise PluginError(f"{kind}: expected {{name: ..., <arguments>}}, got {spec!r}")
    kwargs = dict(spec)
    return str(kwargs.pop("name")), kwargs


def build(kind: str, spec: dict[str, Any] | str, *args: Any) -> Any:
    """Build the plugin named in ``spec`` with the group's positional ``args`` and the spec's arguments.

    What the factory returns is checked before lmforge uses it: the group's members; a dataset's key()
    (:data:`CORPUS_KEY`); that a tokenizer comes back from a checkpoint exactly as it is (its class's
    ``from_dict`` on its ``to_dict()``), so a run cannot train for hours and leave an unusable checkpoint.
    """
    name, kwargs = split_spec(kind, spec)
    info = find(kind, name)
    factory = load(info)
    check_factory(info, factory)
    check_kwargs(kind, name, factory, kwargs)
    result = factory(*args, **kwargs)
    _check_result(info, result)
    if kind == "dataset":
        _check_corpus_key(info, result)
    check = _group(kind).check
    if check is not None:
        problem = import_target(check)(result)
        if problem:
            raise PluginError(f"{info.describe()} cannot be saved in checkpoints: {problem}")
    return result


OPTIMIZER_STATE_HOOK = "state_bytes"
"""Optional attribute of an optimizer factory for ``lmforge estimate``: the bytes of optimizer state per trainable
parameter element (a number, e.g. ``8`` for two fp32 states), or a callable ``(param) -> int`` giving the state's
bytes for one parameter tensor (a meta tensor of the parameter's shape and dtype). Factories without it are
estimated as AdamW."""


def optimizer_state_bytes(spec: dict[str, Any] | str) -> Any:
    """The :data:`OPTIMIZER_STATE_HOOK` the optimizer plugin named in ``spec`` declares, or None (it is loaded,
    not built)."""
    name, _ = split_spec("optimizer", spec)
    return getattr(load(find("optimizer", name)), OPTIMIZER_STATE_HOOK, None)


def validate(kind: str, spec: dict[str, Any] | str) -> None:
    """Check that ``spec`` names a loadable plugin and fits its arguments, without building it."""
    name, kwargs = split_spec(kind, spec)
    info = find(kind, name)
    factory = load(info)
    check_factory(info, factory)
    check_kwargs(kind, name, factory, kwargs)


def _check_result(info: PluginInfo, result: Any) -> None:
    members = {"tokenizer": TOKENIZER_MEMBERS, "dataset": CORPUS_MEMBERS, "filter": FILTER_MEMBERS}.get(info.kind, ())
    missing = [m for m in members if not hasattr(result, m)]
    problem = f"what it returned lacks {', '.join(missing)}" if missing else None
    if info.kind == "optimizer":
        import torch

        if not isinstance(result, torch.optim.Optimizer):
            problem = f"it returned {type(result).__name__}, not a torch.optim.Optimizer"
    if problem:
        raise PluginError(
            f"{info.describe()} breaks the protocol: {problem}; a {info.kind} plugin is {_group(info.kind).protocol}"
        )


def corpus_key_problem(key: Any) -> str | None:
    """None when ``key`` is a valid corpus key (:data:`CORPUS_KEY`), else what is wrong with it."""
    if isinstance(key, str) and CORPUS_KEY.fullmatch(key):
        return None
    shown = repr(key) if len(repr(key)) <= 60 else repr(key)[:57] + "..."
    if isinstance(key, str) and len(key) > 128:
        shown += f" ({len(key)} characters)"
    return (
        f"key() returned {shown}; a corpus key names cache files, so it must be a non-empty str of letters, "
        "digits, '.', '_' and '-', at most 128 characters (e.g. the first 32 hex digits of a sha256 of the content)"
    )


def _check_corpus_key(info: PluginInfo, corpus: Any) -> None:
    problem = corpus_key_problem(corpus.key())
    if problem:
        raise PluginError(f"{info.describe()} breaks the protocol: {problem}")


@dataclass(frozen=True)
class PluginStatus:
    info: PluginInfo
    status: str
    """ok, or the error that loading it gave (with ``load=False``: empty, or the name clash)."""


def inspect_all(load_plugins: bool = True) -> Iterator[PluginStatus]:
    """Every discovered plugin (for ``lmforge plugins``), reporting instead of raising.

    ``load_plugins=False`` reads the entry-point metadata only (nothing is imported; status is empty, or the
    name clash); otherwise each plugin is imported and its factory checked (status ok or ``error: ...``)."""
    for kind in GROUPS:
        for _, claims in sorted(discover(kind).items()):
            for info in claims:
                if len(claims) > 1:
                    others = ", ".join(c.distribution for c in claims if c is not info)
                    yield PluginStatus(info, f"{'error: ' if load_plugins else ''}name also claimed by {others}")
                    continue
                if not load_plugins:
                    yield PluginStatus(info, "")
                    continue
                try:
                    check_factory(info, load(info))
                    yield PluginStatus(info, "ok")
                except PluginError as err:
                    yield PluginStatus(info, "error: " + str(err).split(": ", 1)[-1])
