"""The commands that are not training runs: ``lmforge plugins``, ``export``, ``generate`` and ``evaluate``,
and what they share (one-line argument errors, tables).

None of them imports Lightning: they start in about the time ``import torch`` takes, and ``--help``
(or ``lmforge plugins``) in a fraction of it.
"""

from __future__ import annotations

import argparse
import json
import os

from lmforge.errors import ExistingPathError, UserError


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
