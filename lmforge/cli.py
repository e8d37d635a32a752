"""``lmforge COMMAND``: the entry point.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI runs (:mod:`lmforge.lightning_cli`);
``plugins``, ``export``, ``generate`` and ``evaluate`` are lmforge's own commands
(:mod:`lmforge.commands`; ``estimate`` lives in :mod:`lmforge.estimate`). Lightning is imported only for the
first kind, so ``lmforge --help``,
``lmforge plugins`` and ``lmforge export --help`` answer at once.

Errors: a :class:`~lmforge.errors.UserError` (bad input) is one line on stderr and exit code 2
(``LMFORGE_DEBUG=1`` shows its traceback). Anything else is a bug: its traceback is shown with a line
asking to report it, exit code 1. ``fit`` stopped by SIGINT or SIGTERM saves a checkpoint, says where,
and exits with 130 or 143.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import traceback

_START = time.perf_counter()

TRAINING = ("fit", "validate", "test", "predict")
HELP = """usage: lmforge COMMAND [OPTIONS]

Pretrain and fine-tune Transformer language models with PyTorch Lightning and Triton kernels.

training runs (LightningCLI; `lmforge fit --help` lists every option of a config):
  fit        train:                      lmforge fit -c configs/gpt-small.yaml
  validate   loss and perplexity:        lmforge validate -c CONFIG --ckpt_path CKPT
  test       the same on the test split (classifiers: a per-class report)
  predict    sample continuations:       lmforge predict -c CONFIG --ckpt_path CKPT

budget and data:
  estimate   memory, FLOPs, time, energy, CO2 and cost before a run:  lmforge estimate -c CONFIG --gpu h100
  data       what the corpus is through each cleaning step, in tokens: lmforge data report -c CONFIG

models:
  export     write a checkpoint for transformers, GGUF, ...:  lmforge export CKPT --to DIR --format hf
  generate   continue prompts:           lmforge generate CKPT_OR_HF_DIR --prompt TEXT
  evaluate   score on a data file:       lmforge evaluate MODEL --task multiple_choice --data FILE

plugins:
  plugins    list installed plugins (datasets, tokenizers, optimizers, schedulers, exporters)
             `lmforge plugins check DIST` runs a plugin distribution through its protocol

options:
  -h, --help  show this message; `lmforge COMMAND --help` for a command
  --version   print lmforge's version
"""


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it may be replaced, e.g. by pytest's capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _process_rank() -> int:
    """This process's rank as torchrun (RANK), SLURM (SLURM_PROCID) or Lightning's launcher set it; 0 alone."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):  # LOCAL_RANK: the processes Lightning starts itself
        try:
            return int(os.environ[key])
        except (KeyError, ValueError):
            continue
    return 0


def _show_lmforge_logs() -> None:
    """lmforge's INFO messages (cache reuse, kernel fallbacks) on stderr, as Lightning shows its own.

    Records still propagate, so an application's own logging (or pytest's caplog) sees them too; a
    process without root handlers prints each once."""
    logger = logging.getLogger("lmforge")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        rank = _process_rank()
        if rank:  # under torchrun or SLURM, the other ranks say only what goes wrong, and which rank they are
            handler.addFilter(lambda record: record.levelno >= logging.WARNING)
            handler.setFormatter(logging.Formatter(f"lmforge[rank {rank}]: %(message)s"))
        else:
            handler.setFormatter(logging.Formatter("lmforge: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _one_line(message: str) -> str:
    """An error as one line: jsonargparse wraps a class's own error in a multi-line union report, and a
    DataLoader worker's error arrives with the worker's traceback in its message."""
    inner = re.search(r"Errors:\s*\n\s*- (.+)", message)
    if inner and "Does not validate against any of the Union subtypes" in message:
        return inner.group(1).strip()
    if "Original Traceback" in message:
        last = [line for line in message.strip().splitlines() if line.strip()][-1]
        return re.sub(r"^[\w.]+Error: ", "", last.strip())
    return " ".join(message.split())


def _report_bug(err: BaseException) -> None:
    traceback.print_exception(err)
    frames = traceback.extract_tb(err.__traceback__)
    where = frames[-1].filename if frames else "?"
    print(
        f"lmforge: internal error: {type(err).__name__} raised in {where}. This is a bug (in lmforge, or in a "
        "plugin it ran), not a problem with your input: please report it with the traceback above.",
        file=sys.stderr,
    )


def _is_sigterm_exit(err: SystemExit) -> bool:
    return type(err).__name__ == "SIGTERMException"  # Lightning's, a SystemExit with code None (0)


def main(argv: list[str] | None = None) -> None:
    from lmforge.errors import TrainingInterrupted, UserError

    _show_lmforge_logs()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if not args or args[0] in ("-h", "--help", "help"):
            print(HELP, end="")
            return
        if args[0] == "--version":
            import lmforge

            print(f"lmforge {lmforge.__version__}")
            return
        if args[0] == "estimate":  # lmforge.estimate uses lmforge.commands' tables: it is not in COMMANDS
            from lmforge.estimate import estimate_command
            from lmforge.lightning_cli import parse_fit_config

            estimate_command(args[1:], parse_fit_config)
            return
        if args[0] == "data":  # the same: lmforge.data.report reads fit's config and uses commands' tables
            from lmforge.data.report import data_command
            from lmforge.lightning_cli import parse_fit_config

            data_command(args[1:], parse_fit_config)
            return
        from lmforge.commands import COMMANDS

        if args[0] in COMMANDS:
            COMMANDS[args[0]](args[1:])
            return
        from lmforge import lightning_cli

        lightning_cli.run(args, started=_START)
    except UserError as err:
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"lmforge: error: {_one_line(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingInterrupted as err:
        if err.rank_zero:
            print(f"lmforge: interrupted by {err.describe()}", file=sys.stderr, flush=True)
        raise SystemExit(err.code) from None
    except SystemExit as err:
        if _is_sigterm_exit(err):  # before training started: nothing to save
            print("lmforge: interrupted by SIGTERM before training started; nothing was saved", file=sys.stderr)
            raise SystemExit(143) from None
        raise
    except KeyboardInterrupt:
        print("\nlmforge: interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:  # the reader went away (`lmforge ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        raise SystemExit(141) from None
    except Exception as err:
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        _report_bug(err)
        raise SystemExit(1) from None
