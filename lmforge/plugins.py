"""Plugins: named factories found through Python entry points, lmforge's own included.

A distribution adds a plugin by declaring an entry point in one of the groups below::

    [project.entry-points."lmforge.optimizers"]
    lion = "lmforge_lion:build_lion"

and every lmforge user can then write ``optimizer: {name: lion, lr: 3e-4}`` in a config. lmforge's
built-ins are declared the same way in its own pyproject.toml: there is no private side door.

Discovery is lazy: reading the entry-point table imports nothing; a plugin's module is imported
only when the plugin is used or ``lmforge plugins`` lists it. A plugin that fails to import or
breaks its group's protocol is reported with its name, distribution, version and error, and
never breaks the rest of lmforge. Two distributions claiming one name is an error naming both.
``LMFORGE_DISABLE_PLUGIN_AUTOLOAD=1`` (or the config key ``plugin_autoload: false``) hides every
plugin that lmforge itself does not ship.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
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


GROUPS: dict[str, Group] = {
    g.kind: g
    for g in (
        Group(
            "lmforge.datasets",
            "dataset",
            "a callable (**kwargs) -> Corpus: an object with key() -> str (changes when the content does), "
            "documents() -> Iterator[str] and num_bytes() -> int (an estimate, for progress bars)",
            (),
        ),
        Group(
            "lmforge.tokenizers",
            "tokenizer",
            "a callable (corpus, cache_dir, **kwargs) -> Tokenizer: vocab_size, eos_id, encode, encode_batch, "
            "decode, fingerprint, to_dict and save (see lmforge.tokenizers.Tokenizer)",
            ("corpus", "cache_dir"),
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
            "a callable (checkpoint, out_dir, **kwargs) -> pathlib.Path: reads an lmforge checkpoint file and "
            "writes the export into the folder out_dir, returning it",
            ("checkpoint", "out_dir"),
        ),
    )
}

# Checks of what a factory returned, per kind: (test, what is missing when it fails).
TOKENIZER_MEMBERS = ("vocab_size", "eos_id", "encode", "encode_batch", "decode", "fingerprint", "to_dict", "save")
CORPUS_MEMBERS = ("key", "documents", "num_bytes")


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
        dist = ep.dist
        info = PluginInfo(kind, ep.name, ep.value, dist.name if dist else "?", dist.version if dist else "?")
        if info.builtin or include_third_party:
            entries = found.setdefault(ep.name, [])
            if info not in entries:  # the same distribution seen twice on sys.path is not a clash
                entries.append(info)
    return found


def names(kind: str) -> list[str]:
    return sorted(discover(kind))


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


def _import(info: PluginInfo) -> Any:
    module_name, _, attr = info.value.partition(":")
    try:
        obj = importlib.import_module(module_name.strip())
        for part in attr.strip().split(".") if attr else ():
            obj = getattr(obj, part)
    except Exception as err:
        raise PluginError(f"{info.describe()} failed to load: {type(err).__name__}: {err}") from err
    return obj


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
    """Raise PluginError when ``kwargs`` do not fit the factory's signature, before anything runs."""
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


def split_spec(kind: str, spec: dict[str, Any] | str) -> tuple[str, dict[str, Any]]:
    """``{name: x, **kwargs}`` (or just ``"x"``) -> (name, kwargs)."""
    if isinstance(spec, str):
        return spec, {}
    if not isinstance(spec, dict) or "name" not in spec:
        raise PluginError(f"{kind}: expected {{name: ..., <arguments>}}, got {spec!r}")
    kwargs = dict(spec)
    return str(kwargs.pop("name")), kwargs


def build(kind: str, spec: dict[str, Any] | str, *args: Any) -> Any:
    """Build the plugin named in ``spec`` with the group's positional ``args`` and the spec's arguments."""
    name, kwargs = split_spec(kind, spec)
    info = find(kind, name)
    factory = _import(info)
    check_factory(info, factory)
    check_kwargs(kind, name, factory, kwargs)
    result = factory(*args, **kwargs)
    _check_result(info, result)
    return result


def validate(kind: str, spec: dict[str, Any] | str) -> None:
    """Check that ``spec`` names a loadable plugin and fits its arguments, without building it."""
    name, kwargs = split_spec(kind, spec)
    info = find(kind, name)
    factory = _import(info)
    check_factory(info, factory)
    check_kwargs(kind, name, factory, kwargs)


def _check_result(info: PluginInfo, result: Any) -> None:
    members = {"tokenizer": TOKENIZER_MEMBERS, "dataset": CORPUS_MEMBERS}.get(info.kind, ())
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


@dataclass(frozen=True)
class PluginStatus:
    info: PluginInfo
    status: str
    """ok, or the error that loading it gave."""


def inspect_all() -> Iterator[PluginStatus]:
    """Load every discovered plugin (for ``lmforge plugins``), reporting instead of raising."""
    for kind in GROUPS:
        for _, claims in sorted(discover(kind).items()):
            for info in claims:
                if len(claims) > 1:
                    others = ", ".join(c.distribution for c in claims if c is not info)
                    yield PluginStatus(info, f"error: name also claimed by {others}")
                    continue
                try:
                    check_factory(info, _import(info))
                    yield PluginStatus(info, "ok")
                except PluginError as err:
                    yield PluginStatus(info, "error: " + str(err).split(": ", 1)[-1])
