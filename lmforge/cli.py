"""``lmforge fit|validate|test|predict -c CONFIG``: LightningCLI in omegaconf mode; and
``lmforge plugins`` and ``lmforge export``.

Every run gets a ``checkpoint`` section (a ModelCheckpoint that keeps ``last.ckpt`` in
``<default_root_dir>/checkpoints``, so ``--ckpt_path last`` resumes) and a ``throughput`` section
(tokens/s). Defaults that follow ``trainer.default_root_dir``, even when it is overridden on the
command line: ``trainer.logger: null`` means CSV and TensorBoard logs in ``<default_root_dir>/csv``
and ``/tensorboard``; ``trainer.precision: null`` means bf16-mixed on GPUs that support it,
32-bit elsewhere. Bad input ends with one line on stderr; ``LMFORGE_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import sys
import time

_START = time.perf_counter()
_ARGS: list[str] | None = None  # the argv given to main(), for error messages

import lightning as L  # noqa: E402
import yaml  # noqa: E402
from jsonargparse import Namespace  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402

from lmforge import callbacks, ops, plugins  # noqa: E402
from lmforge.data.sources import CorpusError  # noqa: E402
from lmforge.pretrain import LMForgeModule  # noqa: E402

# jsonargparse parses a subclass's init_args in "omegaconf" mode before registering that loader's
# exceptions (a KeyError 'omegaconf'); registering the loader first avoids it.
try:  # noqa: E402
    from jsonargparse._loaders_dumpers import set_omegaconf_loader

    set_omegaconf_loader("omegaconf")
except ImportError:  # a jsonargparse without the private helper: nothing to work around
    pass


class UserError(Exception):
    """An error caused by the user's input; printed as one line."""


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
        inner = re.sub(
            r"(unknown key |did you mean )'([\w.\-]+)'", lambda m: f"{m.group(1)}'{prefix}.{m.group(2)}'", inner
        )
        inner = re.sub(r"^([\w.\-]+)=", lambda m: f"{prefix}.{m.group(1)}=", inner)
        return f"config: {inner[:500]}"
    config = _config_path(sys.argv[1:] if _ARGS is None else _ARGS)
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


class LmforgeCLI(LightningCLI):
    """LightningCLI for lmforge: the pretraining module and data module, omegaconf interpolation."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Pretraining is the default task; fine-tuning configs name their classes with class_path.
        # The default is only set when nothing names a class: jsonargparse would otherwise carry the
        # default class's init_args (e.g. PretrainDataModule's tokenizer) over to the named one.
        args = sys.argv[1:] if _ARGS is None else _ARGS
        for key, default in (
            ("model", "lmforge.pretrain.PretrainModule"),
            ("data", "lmforge.data.pretrain.PretrainDataModule"),
        ):
            if not _names_class(args, key):
                parser.set_defaults({key: {"class_path": default}})
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 500})
        parser.add_lightning_class_args(callbacks.TokenThroughput, "throughput")
        parser.add_argument(
            "--plugin_autoload",
            type=bool,
            default=True,
            help=f"Load third-party plugins (false: only lmforge's own; also {plugins.AUTOLOAD_ENV}=1)",
        )

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


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def plugins_command(argv: list[str]) -> None:
    """``lmforge plugins [--json]``: every plugin group, name, distribution, version and load status."""
    parser = argparse.ArgumentParser(prog="lmforge plugins", description=plugins_command.__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    rows = [
        {
            "group": plugins.GROUPS[st.info.kind].name,
            "name": st.info.name,
            "distribution": st.info.distribution,
            "version": st.info.version,
            "builtin": st.info.builtin,
            "status": st.status,
            "target": st.info.value,
        }
        for st in plugins.inspect_all()
    ]
    if args.json:
        print(json.dumps({"autoload": plugins.autoload_enabled(), "plugins": rows}, indent=2))
        return
    headers = ["group", "name", "distribution", "version", "status", "target"]
    print(format_table(headers, [[r[h] for h in headers] for r in rows]))
    if not plugins.autoload_enabled():
        print(f"(third-party plugins hidden: {plugins.AUTOLOAD_ENV} is set)")


def export_command(argv: list[str]) -> None:
    """``lmforge export CKPT --to DIR [--format NAME] [--arg KEY=VALUE ...] [--push-to-hub REPO_ID]
    [--private] [--revision BRANCH] [--space DIR] [--push-space SPACE_ID]``: run an exporter plugin,
    then optionally share the folder on the Hugging Face Hub and write a Gradio demo for it."""
    parser = argparse.ArgumentParser(prog="lmforge export", description=export_command.__doc__)
    parser.add_argument("checkpoint", help="a .ckpt written by lmforge fit")
    parser.add_argument("--to", required=True, help="the folder to create")
    parser.add_argument("--format", default="safetensors", help="an exporter plugin: hf, safetensors, gguf, ...")
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE", help="exporter argument")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--revision", help="upload to this branch (created when missing)")
    parser.add_argument("--space", metavar="DIR", help="also write a Gradio demo (a Space folder) for the model")
    parser.add_argument("--push-space", metavar="SPACE_ID", help="upload the demo folder as this Hub Space")
    args = parser.parse_args(argv)
    kwargs = {}
    for item in args.arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"export: --arg {item!r} is not KEY=VALUE")
        kwargs[key] = yaml.safe_load(value)
    if (args.space or args.push_space) and args.format != "hf":
        raise UserError("export: --space serves a transformers model; use it with --format hf")
    if args.push_space and not args.space:
        raise UserError("export: --push-space needs --space DIR (the demo folder to write and upload)")
    if args.space and os.path.exists(args.space):
        raise FileExistsError(f"space folder {args.space} already exists; remove it or choose another")
    from lmforge import hub

    for repo in (args.push_to_hub, args.push_space):
        if repo:
            hub.validate_repo_id(repo)  # before the export, so a typo costs nothing
    out = plugins.build("exporter", {"name": args.format, **kwargs}, args.checkpoint, args.to)
    print(f"lmforge: exported {args.checkpoint} as {args.format} to {out}")
    if args.push_to_hub:
        url = hub.push_folder(out, args.push_to_hub, private=args.private, revision=args.revision)
        print(f"lmforge: pushed {out} to {url}")
    if args.space:
        space = hub.write_space(out, args.space, model_repo_id=args.push_to_hub)
        print(f"lmforge: wrote a Gradio demo to {space}")
        if args.push_space:
            url = hub.push_folder(space, args.push_space, private=args.private, repo_type="space")
            print(f"lmforge: pushed the demo to {url}")


def generate_command(argv: list[str]) -> None:
    """``lmforge generate MODEL --prompt TEXT``: see lmforge.generate."""
    from lmforge import generate

    generate.main(argv)


def evaluate_command(argv: list[str]) -> None:
    """``lmforge evaluate MODEL --task ... --data FILE``: see lmforge.evaluate."""
    from lmforge import evaluate

    evaluate.main(argv)


COMMANDS = {
    "plugins": plugins_command,
    "export": export_command,
    "generate": generate_command,
    "evaluate": evaluate_command,
}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it may be replaced, e.g. by pytest's capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _show_lmforge_logs() -> None:
    """lmforge's INFO messages (cache reuse, kernel fallbacks) on stderr, as Lightning shows its own.

    Records still propagate, so an application's own logging (or pytest's caplog) sees them too; a
    process without root handlers prints each once."""
    logger = logging.getLogger("lmforge")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("lmforge: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _one_line(message: str) -> str:
    """An error as one line: jsonargparse wraps a class's own error in a multi-line union report."""
    inner = re.search(r"Errors:\s*\n\s*- (.+)", message)
    if inner and "Does not validate against any of the Union subtypes" in message:
        return inner.group(1).strip()
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> None:
    global _ARGS
    callbacks.PROCESS_START = _START
    _show_lmforge_logs()
    _ARGS = argv
    args = sys.argv[1:] if argv is None else argv
    try:
        if args and args[0] in COMMANDS:
            COMMANDS[args[0]](args[1:])
            return
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
            args=argv,
        )
    except (UserError, CorpusError, ValueError, FileNotFoundError, FileExistsError, yaml.YAMLError) as err:
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"lmforge: error: {_one_line(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
