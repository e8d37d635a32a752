"""``lmforge fit|validate|test|predict``: LightningCLI in omegaconf mode, with one-line errors.

Every run gets a ``checkpoint`` section (:class:`lmforge.callbacks.Checkpointing`, a ModelCheckpoint that
keeps ``last.ckpt`` in ``<default_root_dir>/checkpoints``, so ``--ckpt_path last`` resumes; it writes
atomically, always saves the end of a run and saves at SIGINT/SIGTERM) and a ``throughput`` section
(tokens/s). Defaults that follow ``trainer.default_root_dir``, even when it is overridden on the
command line: ``trainer.logger: null`` means CSV and TensorBoard logs in ``<default_root_dir>/csv``
and ``/tensorboard``; ``trainer.precision: null`` means bf16-mixed on GPUs that support it,
32-bit elsewhere.

``--ckpt_path`` is checked before anything runs (a missing, damaged, foreign or hostile file is one
line, with the newest readable checkpoint beside it offered), and the checkpoint never overrides the
config: the run uses the config's settings and says which differ from the checkpoint's (see
:meth:`lmforge.task.LMForgeModule.on_load_checkpoint`).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lmforge import callbacks, ops, parallel, plugins
from lmforge.errors import UserError
from lmforge.task import LMForgeModule

log = logging.getLogger(__name__)

# jsonargparse parses a subclass's init_args in "omegaconf" mode before registering that loader's
# exceptions (a KeyError 'omegaconf'); registering the loader first avoids it.
try:
    from jsonargparse._loaders_dumpers import set_omegaconf_loader

    set_omegaconf_loader("omegaconf")
except ImportError:  # a jsonargparse without the private helper: nothing to work around
    pass

ARGS: list[str] = []  # the command line being run, for error messages


class LmforgeArgumentParser(LightningArgumentParser):
    """Turns jsonargparse's multi-line parse errors into one line with a suggestion."""

    def error(self, message: str, ex: Exception | None = None):
        raise UserError(_explain_parse_error(message, self))


def _all_keys(parser) -> list[str]:
    """Every option name the parser (and its subcommands, without their prefix) accepts."""
    keys: list[str] = []
    for action in parser._actions:
        subparsers = getattr(action, "_name_parser_map", None)
        if subparsers:
            for sub in subparsers.values():
                keys.extend(_all_keys(sub))
        elif action.dest not in ("help", "config", "print_config"):
            keys.append(action.dest)
    return list(dict.fromkeys(keys))


def _config_path(args: list[str]) -> str:
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return "the config file"


_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "list": "a list",
               "dict": "a mapping"}  # fmt: skip


def _explain_parse_error(message: str, parser) -> str:
    text = " ".join(message.split())
    # An error inside model/data (subclass mode) arrives wrapped: keep the inner line, keys prefixed.
    nested = re.search(
        r'Parser key "([\w.\-]+)": Does not validate against any of the Union subtypes.*?Errors: - (.*?) - Expected a',
        text,
    )
    if nested:
        prefix, inner = nested.group(1), nested.group(2).strip()
        inner = re.sub(r"^config: ", "", inner)
        kind = re.match(r"Expected a <class '(\w+)'>$", inner)
        given = re.search(r"NestedArg\(key='([\w.\-]+)', val='(.*?)'\)", text)
        typed = re.match(r"Parser key \"([\w.\-]+)\": Expected a <class '(\w+)'>\. Got value: (.*)$", inner)
        if typed:  # e.g. --data.batch_size abc
            return f"config: {prefix}.{typed.group(1)}={typed.group(3)!r} must be {_TYPE_WORDS.get(typed.group(2), typed.group(2))}"
        if kind and given:  # e.g. --data.pipeline normalize: a plain word where a list belongs
            example = {"list": "[a, b]", "dict": "{key: value}"}.get(kind.group(1), kind.group(1))
            return (
                f"config: {prefix}.{given.group(1)}={given.group(2)!r} must be {_TYPE_WORDS.get(kind.group(1), kind.group(1))}; give it in YAML "
                f"syntax, e.g. --{prefix}.{given.group(1)} '{example}'"
            )
        inner = re.sub(
            r"(unknown key |did you mean )'([\w.\-]+)'", lambda m: f"{m.group(1)}'{prefix}.{m.group(2)}'", inner
        )
        inner = re.sub(r"^([\w.\-]+)=", lambda m: f"{prefix}.{m.group(1)}=", inner)
        return f"config: {inner[:500]}"
    config = _config_path(ARGS)
    missing = re.search(r"File does not exist: '([^']+)'", text)
    if missing:
        return (
            f"config file {missing.group(1)!r} not found; give the path to a YAML file, e.g. -c configs/gpt-small.yaml"
        )
    if "Problems parsing config" in text:
        where = re.search(r"line (\d+), column (\d+)", text)
        at = f" at line {where.group(1)}, column {where.group(2)}" if where else ""
        detail = text.split("Problems parsing config:", 1)[1].split(' in "<unicode string>"')[0].strip()
        return f"config file {config} is not valid YAML{at}: {detail}"
    unknown = re.search(
        r"does not accept option '([\w.\-]+)'|unrecognized arguments: --([\w.\-]+)|Option '([\w.\-]+)' is not accepted",
        text,
        re.I,
    )
    if unknown:
        key = unknown.group(1) or unknown.group(2) or unknown.group(3)
        keys = _all_keys(parser)
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        if "." not in key:  # a key nested in a YAML mapping is reported without its parents
            leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(keys)}
            leaf = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.6)
            if leaf and "." in leaves[leaf[0]]:
                close = [leaves[leaf[0]]]
                key = f"{close[0].rsplit('.', 1)[0]}.{key}"
        hint = f"; did you mean {close[0]!r}?" if close else "; see the valid keys with --help"
        return f"config: unknown key {key!r}{hint}"
    literal = re.search(r'Parser key "([\w.\-]+)": Expected a typing\.Literal\[(.*?)\]\. Got value: (\S+)', text)
    if literal:
        return f"config: {literal.group(1)}={literal.group(3)!r} is not one of {literal.group(2)}"
    bad_class = re.search(r"Problem with given class_path '([^']+)': (.*?) - Expected a", text)
    if bad_class:
        return f"config: class_path {bad_class.group(1)!r} cannot be used ({bad_class.group(2).strip()[:200]})"
    return f"config: {text[:500]}"


def _names_class(args: list[str], key: str) -> bool:
    """Whether the command line or one of its config files chooses a class for ``key`` (model or data)."""
    for i, arg in enumerate(args):
        if arg in (f"--{key}", f"--{key}.class_path") or arg.startswith((f"--{key}=", f"--{key}.class_path=")):
            return True
        if arg in ("-c", "--config") and i + 1 < len(args) or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if arg.startswith("--config=") else args[i + 1]
            try:
                with open(path, encoding="utf-8") as f:
                    values = yaml.safe_load(f)
            except (OSError, yaml.YAMLError):
                continue  # the parser reports unreadable configs itself
            section = values.get(key) if isinstance(values, dict) else None
            if isinstance(section, dict) and "class_path" in section:
                return True
    return False


parallel.register_strategies()  # trainer.strategy: fsdp2


class LmforgeCLI(LightningCLI):
    """LightningCLI for lmforge: the pretraining module and data module, omegaconf interpolation."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Pretraining is the default task; fine-tuning configs name their classes with class_path.
        # The default is only set when nothing names a class: jsonargparse would otherwise carry the
        # default class's init_args (e.g. PretrainDataModule's tokenizer) over to the named one.
        args = ARGS
        for key, default in (
            ("model", "lmforge.pretrain.PretrainModule"),
            ("data", "lmforge.data.pretrain.PretrainDataModule"),
        ):
            if not _names_class(args, key):
                parser.set_defaults({key: {"class_path": default}})
        parser.add_lightning_class_args(callbacks.Checkpointing, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 500})
        parser.add_lightning_class_args(callbacks.TokenThroughput, "throughput")
        parser.add_lightning_class_args(callbacks.EnergyMeter, "energy")
        parser.add_argument(
            "--plugin_autoload",
            type=bool,
            default=True,
            help=f"Load third-party plugins (false: only lmforge's own; also {plugins.AUTOLOAD_ENV}=1)",
        )

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before anything runs; unlike LightningCLI's own, take nothing from it.

        LightningCLI would replace the model section with the checkpoint's hyperparameters, command-line
        flags included. lmforge keeps the config: the modules compare it with the checkpoint when it loads
        (a shape that differs is an error naming the key; other differences are applied and printed).
        """
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if not ckpt_path or ckpt_path in ("best", "hpc", "registry") or str(ckpt_path).startswith("registry:"):
            return
        from lmforge.checkpoint import read_lmforge_checkpoint, refuse_damaged
        from lmforge.errors import CheckpointError

        if ckpt_path == "last":  # as Lightning resolves it: the newest last*.ckpt in the checkpoint folder
            root = config.trainer.default_root_dir or "."
            folder = Path(config.checkpoint.dirpath or os.path.join(root, "checkpoints"))
            candidates = [p for p in folder.glob("*last*.ckpt") if p.is_file()] if folder.is_dir() else []
            if not candidates:
                return  # Lightning says there is no last checkpoint and starts from scratch
            path = max(candidates, key=lambda p: p.stat().st_mtime)
        else:
            path = Path(ckpt_path)
        try:
            read_lmforge_checkpoint(path, mmap=True)
        except CheckpointError as err:
            raise refuse_damaged(path, CheckpointError(f"--ckpt_path: {err}")) from None

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # jsonargparse wraps an error of a class's __init__ in its own ValueError
            inner = _user_error_in(err)
            if inner is not None and inner is not err:
                raise inner from None
            raise

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if not config.plugin_autoload:
            plugins.autoload_override = False
        trainer = config.trainer
        if trainer.precision is None:
            trainer.precision = "bf16-mixed" if ops.cuda_supports_bf16() else "32-true"
        root = trainer.default_root_dir or "."
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        if trainer.logger is None or trainer.logger is True:
            trainer.logger = [
                Namespace(class_path=f"lightning.pytorch.loggers.{cls}", init_args=Namespace(save_dir=root, name=name))
                for cls, name in (("CSVLogger", "csv"), ("TensorBoardLogger", "tensorboard"))
            ]

    def after_fit(self) -> None:
        """Print :func:`lmforge.estimate.against_measured`: the estimate of this run beside its measurement."""
        trainer = self.trainer
        meter = next((c for c in trainer.callbacks if isinstance(c, callbacks.EnergyMeter)), None)
        if meter is None or meter.result is None or not trainer.is_global_zero:
            return
        import torch

        from lmforge import estimate

        device = trainer.strategy.root_device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        try:
            table = estimate.against_measured(self.config[self.subcommand], str(trainer.precision), trainer.global_step,
                                              trainer.num_devices, trainer.num_nodes, name, meter.result)  # fmt: skip
        except Exception as err:  # noqa: BLE001 -- a comparison must not fail a run that trained and saved
            log.info("lmforge: no estimate to compare with the measurement (%s: %s)", type(err).__name__, err)
            return
        if table:
            print(table, flush=True)


def parse_fit_config(argv: list[str]) -> tuple[Any, str | None]:
    """For ``lmforge estimate``: the config ``lmforge fit`` would run with ``argv`` (``-c FILE`` and overrides), parsed and validated by the
    same parser, without instantiating anything; and ``trainer.precision`` as written (before ``fit`` resolves it)."""
    raw_precision: dict[str, Any] = {}

    class _ParseOnly(LmforgeCLI):
        def before_instantiate_classes(self) -> None:
            raw_precision["value"] = self.config.trainer.precision
            super().before_instantiate_classes()

        def instantiate_classes(self) -> None:
            pass

        def _set_seed(self) -> None:  # nothing runs: leave the process's random state alone
            pass

        def _add_instantiators(self) -> None:
            pass

    global ARGS
    ARGS = list(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = _ParseOnly(
            LMForgeModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=LmforgeArgumentParser,
            parser_kwargs={"parser_mode": "omegaconf", "default_env": False},
            seed_everything_default=False,
            run=False,
            args=list(argv),
        )
    precision = raw_precision.get("value")
    return cli.config, None if precision is None else str(precision)


def _user_error_in(err: BaseException) -> UserError | None:
    """The UserError that caused ``err`` (through __cause__/__context__), if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def run(args: list[str], started: float | None = None) -> None:
    """Run LightningCLI on ``args`` (``fit -c CONFIG ...``); ``started`` is when the command started
    (``time.perf_counter()``), for the time-to-first-step line."""
    global ARGS
    ARGS = list(args)
    callbacks.PROCESS_START = started
    try:
        _cli()
    except BaseException:
        _leave_process_group(wait=False)  # the others may never arrive: do not wait for them
        raise
    _leave_process_group(wait=True)


def _leave_process_group(wait: bool) -> None:
    """End a distributed run cleanly: after a run that finished, every rank waits for the others; then the
    process group is destroyed (a rank that exits while gloo's threads still run is aborted, SIGABRT)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def _cli() -> None:
    LmforgeCLI(
        LMForgeModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_class=LmforgeArgumentParser,
        parser_kwargs={
            "parser_mode": "omegaconf",
            "default_env": False,
            "description": "Pretrain and fine-tune language models. Also: lmforge plugins [--json], "
            "lmforge export CKPT --to DIR [--format hf] [--push-to-hub REPO_ID], "
            "lmforge generate MODEL --prompt TEXT, lmforge evaluate MODEL --task TASK --data FILE.",
        },
        save_config_kwargs={"overwrite": True},
        args=None if ARGS == sys.argv[1:] else ARGS,  # LightningCLI warns when given the process's own argv
    )
