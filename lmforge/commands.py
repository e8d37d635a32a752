"""The commands that are not training runs: ``lmforge plugins``, ``export``, ``generate`` and ``evaluate``,
and what they share (one-line argument errors, tables).

None of them imports Lightning: they start in about the time ``import torch`` takes, and ``--help``
(or ``lmforge plugins``) in a fraction of it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.errors import ExistingPathError, MissingFileError, UserError

if TYPE_CHECKING:
    import torch


class OneLineParser(argparse.ArgumentParser):
    """argparse for lmforge's commands: a usage error is one UserError line, "<command>: <message>",
    which the CLI prints (instead of usage text and exit)."""

    def error(self, message: str):
        raise UserError(f"{self.prog.removeprefix('lmforge ')}: {message}")


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return number


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _looks_like_path(source: str) -> bool:
    return source.endswith(".ckpt") or source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def _pick_device(name: str, command: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{command}: --device cuda but no CUDA device is available; use --device cpu")
    return torch.device(name)


def parse_arg_values(items: list[str], command: str) -> dict:
    """``--arg KEY=VALUE`` items as a dict; each VALUE is read as YAML (``dtype=float16`` is a string,
    ``max_shard_size=100`` an int, ``tags=[a, b]`` a list)."""
    import yaml

    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{command}: --arg {item!r} is not KEY=VALUE")
        try:
            values[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise UserError(f"{command}: --arg {item!r}: the value is not valid YAML ({err.problem})") from None
    return values


def plugins_command(argv: list[str]) -> None:
    """``lmforge plugins [--load] [--json]``: every plugin group, name, distribution, version and target, read
    from the entry-point metadata without importing any plugin (name clashes flagged); ``--load`` (and
    ``--json``) also imports each and reports ok or its error. ``lmforge plugins check DIST [-v]``: run every
    plugin of the installed distribution DIST through its protocol (lmforge.testing), one PASS/FAIL line
    each; exit code 1 when any fails."""
    from lmforge import plugins

    if argv[:1] == ["check"]:
        return _plugins_check(argv[1:])
    parser = OneLineParser(prog="lmforge plugins", description=plugins_command.__doc__)
    parser.add_argument("--load", action="store_true", help="import every plugin and report ok or its error")
    parser.add_argument("--json", action="store_true", help="print JSON (plugins loaded, as with --load)")
    args = parser.parse_args(argv)
    load = args.load or args.json
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
        for st in plugins.inspect_all(load_plugins=load)
    ]
    if args.json:
        print(json.dumps({"autoload": plugins.autoload_enabled(), "plugins": rows}, indent=2))
        return
    if load:
        headers = ["group", "name", "distribution", "version", "status", "target"]
    else:
        headers = ["group", "name", "distribution", "version", "target", "status"]
        if not any(r["status"] for r in rows):
            headers.pop()
    print(format_table(headers, [[r[h] for h in headers] for r in rows]))
    if not load:
        print("(not imported: `lmforge plugins --load` imports each plugin; `lmforge plugins check DIST` tests one)")
    if not plugins.autoload_enabled():
        print(f"(third-party plugins hidden: {plugins.AUTOLOAD_ENV} is set)")


def _plugins_check(argv: list[str]) -> None:
    parser = OneLineParser(prog="lmforge plugins check", description=plugins_command.__doc__)
    parser.add_argument("distribution", help="an installed distribution (lmforge for the built-ins)")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per check, not per plugin")
    args = parser.parse_args(argv)
    from lmforge import testing

    name, version, infos = testing.distribution_plugins(args.distribution)
    failed = 0
    for info in infos:
        results = testing.check_plugin(info.kind, info.name)
        failed += any(not r.ok for r in results)
        if args.verbose:
            for result in results:
                print(f"  {result.line()}")
        print(testing.summary_line(info, results), flush=True)
    print(f"{name} {version}: {len(infos) - failed} of {len(infos)} plugins passed")
    if failed:
        raise SystemExit(1)


def export_command(argv: list[str]) -> None:
    """``lmforge export CKPT --to DIR [--format NAME] [--arg KEY=VALUE ...] [--push-to-hub REPO_ID]
    [--private] [--revision BRANCH] [--space DIR] [--push-space SPACE_ID]``: run an exporter plugin,
    then optionally share the folder on the Hugging Face Hub and write a Gradio demo for it."""
    parser = OneLineParser(prog="lmforge export", description=export_command.__doc__)
    parser.add_argument("checkpoint", help="a .ckpt written by lmforge fit")
    parser.add_argument("--to", required=True, help="the folder to create (it must not exist)")
    parser.add_argument("--format", default="safetensors", help="an exporter plugin: hf, safetensors, gguf, ...")
    parser.add_argument(
        "--arg", action="append", default=[], metavar="KEY=VALUE", help="an exporter argument; VALUE is read as YAML"
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--revision", help="upload to this branch (created when missing)")
    parser.add_argument("--space", metavar="DIR", help="also write a Gradio demo (a Space folder) for the model")
    parser.add_argument("--push-space", metavar="SPACE_ID", help="upload the demo folder as this Hub Space")
    args = parser.parse_args(argv)
    kwargs = parse_arg_values(args.arg, "export")
    if (args.space or args.push_space) and args.format != "hf":
        raise UserError("export: --space serves a transformers model; use it with --format hf")
    if args.push_space and not args.space:
        raise UserError("export: --push-space needs --space DIR (the demo folder to write and upload)")
    if args.space and os.path.exists(args.space):
        raise ExistingPathError(f"space folder {args.space} already exists; remove it or choose another")
    from lmforge import export, hub

    for repo in (args.push_to_hub, args.push_space):
        if repo:
            hub.validate_repo_id(repo)  # before the export, so a typo costs nothing
    out = export.export(args.checkpoint, args.to, args.format, **kwargs)
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


# -- generate ---------------------------------------------------------------------------------------------


def _number(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{value!r} is not a finite number")
    return number


def _model_parser(prog: str, description: str, metavar: str) -> argparse.ArgumentParser:
    """The parser of a command that loads a model (generate, evaluate), with its ``model`` argument."""
    parser = OneLineParser(prog=prog, description=description)
    parser.add_argument(
        "model", metavar=metavar, help="an lmforge .ckpt or export folder, or a Hugging Face folder or Hub id"
    )
    return parser


def _generate_parser() -> argparse.ArgumentParser:
    parser = _model_parser(
        "lmforge generate",
        "Continue prompts with a trained model: greedy or sampled, with a key/value cache. "
        "One prompt streams to the terminal; several print one block each.",
        "CKPT_OR_HF_DIR",
    )
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument(
        "--prompts-file", metavar="FILE", help='prompts, one per line (or .jsonl with a "prompt" field)'
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N", help="tokens per prompt (64)")
    parser.add_argument("--temperature", type=_number, default=0.0, metavar="T", help="0 is greedy (the default)")
    parser.add_argument("--top-k", type=positive_int, metavar="K", help="sample among the K most likely tokens")
    parser.add_argument("--top-p", type=_number, metavar="P", help="sample within probability mass P (nucleus)")
    parser.add_argument(
        "--stop",
        action="extend",
        nargs="+",
        default=[],
        metavar="S",
        help="stop at these strings (\\n, \\t understood)",
    )
    parser.add_argument("--seed", type=int, metavar="N", help="seed for sampling (reproducible)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (slow)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="auto: bfloat16 on a GPU that supports it, else float32",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list of {prompt, completion, ...}")
    return parser


def _unescape(text: str) -> str:
    """--stop '\\n' means a newline (a shell passes the backslash through)."""
    return text.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _load_model(
    source: str, command: str, device_name: str, revision: str | None = None, dtype_name: str | None = None
) -> tuple[Any, Any, dict, torch.device, torch.dtype | None]:
    """(model in eval mode on the device, tokenizer, info, device, dtype) of ``lmforge generate`` and ``lmforge
    evaluate``'s model (:func:`lmforge.checkpoint.load_base`); ``dtype_name`` None keeps the model's dtype. A
    missing local path is a one-line error naming ``command``."""
    if not Path(source).expanduser().exists() and _looks_like_path(source):
        raise MissingFileError(f"{command}: model {source} does not exist")
    device = _pick_device(device_name, command)
    dtype = _pick_dtype(dtype_name, device) if dtype_name is not None else None

    from lmforge.checkpoint import load_base
    from lmforge.encoder import EncoderConfig

    model, tokenizer, info = load_base(source, revision)
    if isinstance(model.config, EncoderConfig):  # BERT, DistilBERT: no next-token distribution to sample from
        raise UserError(
            f"{command}: {source} is a bidirectional encoder ({info.get('family') or 'masked LM'}), which predicts "
            f"masked tokens, not the next one; {command} runs decoder language models. Fine-tune it for "
            "classification (lmforge fit -c configs/finetune-distilbert-classify.yaml) or export it "
            "(lmforge export ... --format hf) for transformers' fill-mask pipeline"
        )
    model = (model.to(device) if dtype is None else model.to(device=device, dtype=dtype)).eval()
    return model, tokenizer, info, device, dtype


def generate_command(argv: list[str]) -> None:
    """``lmforge generate CKPT_OR_HF_DIR --prompt TEXT [...]``: continue prompts (lmforge.generate); bad input
    raises a one-line UserError."""
    from lmforge import generate

    args = _generate_parser().parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += generate.read_prompts_file(args.prompts_file)
    if not prompts:
        raise UserError("generate: no prompt; give --prompt TEXT or --prompts-file FILE")
    generate.check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    source = args.model
    model, tokenizer, info, device, dtype = _load_model(source, "generate", args.device, dtype_name=args.dtype)
    family = info.get("family") or "custom"
    print(
        f"lmforge: loaded {source} ({info['kind']}, {family}, {model.num_parameters() / 1e6:.1f}M parameters) "
        f"on {device.type} in {str(dtype).removeprefix('torch.')}",
        file=sys.stderr,
        flush=True,
    )

    streaming = len(prompts) == 1 and not args.json
    stream = None
    if streaming:
        sys.stdout.write(prompts[0])
        sys.stdout.flush()

        def stream(row: int, piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

    start = time.perf_counter()
    completions = generate.generate_completions(
        model,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop=[_unescape(s) for s in args.stop],
        seed=args.seed,
        use_cache=not args.no_cache,
        stream=stream,
    )
    seconds = time.perf_counter() - start
    if streaming:
        sys.stdout.write("\n")
    elif args.json:
        records = [
            {"prompt": c.prompt, "completion": c.text, "tokens": len(c.token_ids), "finish_reason": c.finish_reason}
            for c in completions
        ]
        print(json.dumps(records, indent=2, ensure_ascii=False))
    else:
        for i, c in enumerate(completions, 1):
            print(f"=== prompt {i} ===\n{c.prompt}\n--- completion {i} ({c.finish_reason}) ---\n{c.text}\n")
    sys.stdout.flush()
    total = sum(len(c.token_ids) for c in completions)
    rate = total / seconds if seconds > 0 else float("inf")
    print(f"lmforge: generated {total} tokens in {seconds:.2f} s ({rate:.1f} tokens/s)", file=sys.stderr, flush=True)


# -- evaluate ---------------------------------------------------------------------------------------------


def _evaluate_parser() -> argparse.ArgumentParser:
    from lmforge.evaluate import NORMALIZE, TASKS

    parser = _model_parser(
        "lmforge evaluate",
        "Evaluate a model on a data file: multiple-choice accuracy, generation metrics "
        "(BLEU, ROUGE, exact match) or perplexity; or what it memorised of the canaries its training run put into "
        "the text (memorization). Prints a table and writes the results as JSON.",
        "MODEL",
    )
    parser.add_argument("--task", required=True, choices=TASKS, help="what to measure")
    parser.add_argument(
        "--data",
        metavar="FILE",
        help=".jsonl/.json records: question/choices/answer (multiple_choice), prompt/completion (generation), "
        "text (perplexity; also a .txt file); not for memorization",
    )
    parser.add_argument(
        "--canaries",
        metavar="JSON",
        help='memorization: the canary settings, e.g. \'{"count": 9, "repeats": [1, 10, 100], "seed": 0}\' '
        "(default: what the checkpoint's run recorded as data.canaries)",
    )
    parser.add_argument(
        "--candidates", type=positive_int, default=1000, metavar="N", help="memorization: random secrets to rank among"
    )
    parser.add_argument("--limit", type=positive_int, metavar="N", help="evaluate the first N records only")
    parser.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="sequences per batch (16)")
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=32, metavar="N", help="generation: tokens per prompt (32)"
    )
    parser.add_argument("--stop", action="append", default=[], metavar="S", help="generation: stop at this string")
    parser.add_argument(
        "--smooth-bleu", action="store_true", help="generation: add-one smoothing of BLEU's 2- to 4-gram precisions"
    )
    parser.add_argument(
        "--normalize", choices=NORMALIZE, default="both", help="multiple_choice: acc (none), acc_norm (length) or both"
    )
    parser.add_argument("--block-size", type=positive_int, metavar="N", help="perplexity: window length (model's)")
    parser.add_argument("--stride", type=positive_int, metavar="N", help="perplexity: window step (block size / 2)")
    parser.add_argument("--revision", help="a Hugging Face Hub id's branch, tag or commit")
    parser.add_argument("--output", metavar="PATH", help="the JSON results file (default: next to the model)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    parser.add_argument(
        "--bad-lines",
        choices=["error", "skip"],
        default="error",
        help="a .jsonl line that does not parse: stop or skip",
    )
    return parser


def default_output(model: str, task: str, data: str) -> Path:
    """``<run>/eval/<task>-<data stem>.json`` for ``<run>/checkpoints/*.ckpt``, else ``./eval/<task>-<stem>.json``."""
    name = f"{task}-{Path(data).stem}.json"
    source = Path(model).expanduser()
    if source.suffix == ".ckpt" and source.parent.name == "checkpoints":
        return source.parent.parent / "eval" / name
    return Path("eval") / name


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def evaluate_command(argv: list[str]) -> None:
    """``lmforge evaluate MODEL --task TASK --data FILE``: score a model (lmforge.evaluate); bad input raises a
    one-line UserError."""
    import lmforge
    from lmforge import evaluate
    from lmforge.atomic import write_json

    prefix = evaluate.PREFIX
    args = _evaluate_parser().parse_args(argv)
    if args.task == "memorization":
        return _memorization_command(args)
    if args.data is None:
        raise UserError(f"{prefix}: --task {args.task} needs --data FILE")
    records = evaluate.read_data(args.data, args.task, args.bad_lines)
    if args.limit is not None:
        records = records[: args.limit]
    checks = {
        "multiple_choice": evaluate.choice_records,
        "generation": evaluate.generation_records,
        "perplexity": evaluate.text_records,
    }
    checks[args.task](records)  # every record is checked before the model loads
    source = args.model
    model, tokenizer, info, device, _ = _load_model(source, prefix, args.device, args.revision)
    print(
        f"lmforge: evaluating {source} ({info['kind']}, {info.get('family') or 'custom'}, "
        f"{model.num_parameters() / 1e6:.1f}M parameters) on {device.type}: {args.task}, "
        f"{len(records)} examples from {args.data}",
        file=sys.stderr,
        flush=True,
    )
    settings: dict[str, Any] = {"batch_size": args.batch_size, "limit": args.limit, "device": device.type}
    if args.task == "multiple_choice":
        settings["normalize"] = args.normalize
        result = evaluate.multiple_choice(model, tokenizer, records, args.normalize, args.batch_size, progress=True)
    elif args.task == "generation":
        settings.update(max_new_tokens=args.max_new_tokens, stop=args.stop, smooth_bleu=args.smooth_bleu)
        result = evaluate.generation_metrics(
            model,
            tokenizer,
            records,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            smooth=args.smooth_bleu,
            stop=args.stop or None,
            progress=True,
        )
    else:
        result = evaluate.perplexity(
            model, tokenizer, records, args.block_size, args.stride, args.batch_size, progress=True
        )
        settings.update(block_size=result["metrics"]["block_size"], stride=result["metrics"]["stride"])

    metrics = result["metrics"]
    print(format_table(["metric", "value"], [[key, _format(value)] for key, value in metrics.items()]))
    if args.task == "generation" and not args.smooth_bleu:
        words = [len(r.split()) for e in result["examples"] for r in e["references"]]
        if words and sum(words) / len(words) < 4:
            print(
                "note: the references average fewer than 4 words, so unsmoothed BLEU-4 is 0 or close to it; "
                "--smooth-bleu scores short outputs by their word matches",
                file=sys.stderr,
            )
    output = Path(args.output).expanduser() if args.output else default_output(source, args.task, args.data)
    values = {
        "task": args.task,
        "model": source,
        "model_info": {k: v for k, v in info.items() if k in ("kind", "family", "revision")},
        "data": args.data,
        "num_examples": len(records),
        "metrics": metrics,
        "settings": settings,
        "lmforge_version": lmforge.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "examples": result["examples"],
    }
    write_json(output, values)
    print(f"lmforge: results written to {output}", file=sys.stderr, flush=True)


def _canary_settings(args: argparse.Namespace) -> dict:
    """The canaries to look for: --canaries, else those the checkpoint's run recorded (data.canaries)."""
    from lmforge.data.canaries import check_settings

    if args.canaries:
        try:
            values = json.loads(args.canaries)
        except json.JSONDecodeError as err:
            raise UserError(f"evaluate: --canaries is not JSON ({err.msg} at character {err.pos})") from None
        return check_settings(values, "--canaries")
    source = Path(args.model).expanduser()
    if not source.exists() and _looks_like_path(args.model):
        raise MissingFileError(f"evaluate: model {args.model} does not exist")
    if source.suffix == ".ckpt" and source.is_file():
        from lmforge.checkpoint import load_checkpoint

        recorded = load_checkpoint(source).data.get("canaries")
        if recorded:
            return check_settings(recorded, f"{source}: data.canaries")
        raise UserError(
            f"evaluate: {source} was trained without canaries (no data.canaries in it); train with "
            "--data.canaries '{count: 9, repeats: [1, 10, 100]}' or pass --canaries"
        )
    raise UserError("evaluate: --task memorization needs --canaries JSON for a model that is not an lmforge .ckpt")


def _memorization_command(args: argparse.Namespace) -> None:
    """``lmforge evaluate MODEL --task memorization``: exposure and extraction of the run's canaries."""
    import lmforge
    from lmforge import evaluate
    from lmforge.atomic import write_json

    settings = _canary_settings(args)
    model, tokenizer, info, device, _ = _load_model(args.model, evaluate.PREFIX, args.device, args.revision)
    print(
        f"lmforge: memorization of {args.model} on {device.type}: {settings['count']} canaries "
        f"(repeats {settings['repeats']}, seed {settings['seed']}), each ranked among {args.candidates:,} random secrets",
        file=sys.stderr,
        flush=True,
    )
    result = evaluate.memorization(model, tokenizer, settings, args.candidates, args.batch_size, progress=True)
    rows = [[str(e["repeats"]), e["prefix"] + e["secret"], f"{e['rank']:,}", f"{e['exposure']:.2f}",
             "yes" if e["extracted"] else "no"] for e in result["examples"]]  # fmt: skip
    print(format_table(["repeats", "canary", "rank", "exposure (bits)", "extracted"], rows))
    print(format_table(["metric", "value"], [[k, _format(v)] for k, v in result["metrics"].items()]))
    output = Path(args.output).expanduser() if args.output else default_output(args.model, "memorization", "canaries")
    values = {
        "task": "memorization",
        "model": args.model,
        "model_info": {k: v for k, v in info.items() if k in ("kind", "family", "revision")},
        "canaries": settings,
        "metrics": result["metrics"],
        "settings": {"candidates": args.candidates, "batch_size": args.batch_size, "device": device.type},
        "lmforge_version": lmforge.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "examples": result["examples"],
    }
    write_json(output, values)
    print(f"lmforge: results written to {output}", file=sys.stderr, flush=True)


COMMANDS = {
    "plugins": plugins_command,
    "export": export_command,
    "generate": generate_command,
    "evaluate": evaluate_command,
}
