"""``lmforge data report -c CONFIG``: what a pretraining corpus is, before and after cleaning, in tokens.

It prepares the config's data exactly as ``lmforge fit`` does (the same dataset, ``data.pipeline``, canaries,
tokenizer and token cache, so a later ``fit`` reuses the work) and reports:

- each cleaning step: documents and bytes in and out, what it removed and why (by reason), duplicate clusters,
  PII redactions by type (recorded in the token cache's metadata, so a cached corpus still reports them);
- the tokens: how many, bytes per token, the training and validation split, document lengths in tokens (a
  histogram and percentiles), vocabulary coverage (ids used, unknown-token rate, the share of the most frequent
  tokens, a rank-frequency curve).

As a table, ``--json``, and PNG plots in ``--out`` (with matplotlib). ``fit`` prints the one-line summary of each
step when it prepares data, and the model card's training-data section lists the steps and what each did
(:func:`lmforge.hf_export._cleaning_lines`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.commands import OneLineParser, format_table
from lmforge.data.pipeline import bytes_text
from lmforge.errors import UserError

CHUNK = 1 << 24
"""Tokens read at a time: the statistics never hold the token file in memory."""
CORPUS_MODULES = ("PretrainDataModule", "MLMDataModule")
DESCRIPTION = (
    "Prepare the config's corpus as `lmforge fit` does (the same cache: fit reuses it) and report documents and "
    "bytes through each data.pipeline step, what each removed and why, duplicate clusters, PII redactions, tokens, "
    "document lengths and vocabulary coverage, as a table, JSON (--json) and PNG plots in --out (default "
    "<trainer.default_root_dir>/data). Overrides as for fit, e.g. --data.pipeline '[{name: dedup}]'."
)


def token_statistics(token_file: Any, tokenizer: Any, top: int = 10) -> dict[str, Any]:
    """Counts over a token file (:class:`lmforge.data.cache.TokenFile`), read in chunks of :data:`CHUNK`."""
    tokens = token_file.open()
    n, vocab, eos = int(token_file.num_tokens), int(tokenizer.vocab_size), int(tokenizer.eos_id)
    counts = np.zeros(vocab, dtype=np.int64)
    lengths: list[np.ndarray] = []
    last_end = -1  # the position of the previous end-of-text token
    for start in range(0, n, CHUNK):
        chunk = np.asarray(tokens[start : start + CHUNK])
        counts += np.bincount(chunk, minlength=vocab)[:vocab]
        ends = np.flatnonzero(chunk == eos) + start
        if ends.size:
            lengths.append(np.diff(np.concatenate([[last_end], ends])) - 1)
            last_end = int(ends[-1])
    doc_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    text_tokens = n - int(counts[eos])
    ranked = np.argsort(-counts, kind="stable")
    used = int((counts > 0).sum())
    unk = getattr(tokenizer, "unk_id", None)
    stats: dict[str, Any] = {
        "tokens": n,
        "documents": int(doc_lengths.size),
        "vocab_size": vocab,
        "vocab_used": used,
        "vocab_coverage": used / vocab,
        "unk_rate": (int(counts[unk]) / max(text_tokens, 1)) if unk is not None else None,
        "top_tokens": [
            {"id": int(i), "text": _show(tokenizer, int(i)), "share": int(counts[i]) / max(n, 1)}
            for i in ranked[:top]
            if counts[i]
        ],
        "top_share": {k: float(counts[ranked[:k]].sum()) / max(n, 1) for k in (10, 100, 1000) if k <= vocab},
        "rank_frequency": [int(c) for c in counts[ranked[: min(used, 5000)]]],
    }
    if doc_lengths.size:
        p = np.percentile(doc_lengths, [50, 90, 99])
        edges = _log_edges(int(doc_lengths.max()))
        hist, _ = np.histogram(doc_lengths, bins=edges)
        stats["document_tokens"] = {
            "mean": float(doc_lengths.mean()),
            "p50": float(p[0]),
            "p90": float(p[1]),
            "p99": float(p[2]),
            "min": int(doc_lengths.min()),
            "max": int(doc_lengths.max()),
            "histogram": {"edges": [int(e) for e in edges], "counts": [int(c) for c in hist]},
        }
    num_bytes = token_file.meta.get("num_bytes")
    if num_bytes:
        stats["bytes"] = int(num_bytes)
        stats["bytes_per_token"] = int(num_bytes) / max(text_tokens, 1)
    return stats


def _log_edges(largest: int) -> list[int]:
    """Histogram bin edges 0, 1, 2, 4, ... (powers of two) up past ``largest``."""
    edges = [0, 1]
    while edges[-1] <= largest:
        edges.append(edges[-1] * 2)
    return edges


def _show(tokenizer: Any, token_id: int) -> str:
    try:
        text = tokenizer.decode([token_id])
    except Exception:  # noqa: BLE001 -- a plugin tokenizer that cannot decode one id: show the id
        return f"<{token_id}>"
    return repr(text)[1:-1] if text else f"<{token_id}>"


def build_report(dm: Any) -> dict[str, Any]:
    """The report of a prepared corpus data module (after ``prepare_data()``)."""
    facts = dm.describe_data()
    steps = dm.pipeline_report()
    train_end, total = dm._split(dm.seq_len, "window")
    return {
        "dataset": facts.get("dataset"),
        "description": facts.get("description"),
        "pipeline": steps,
        "canaries": facts.get("canaries"),
        "token_file": str(dm.token_file.path),
        "split": {"train_tokens": train_end, "val_tokens": total - train_end, "val_fraction": dm.val_fraction},
        "tokens": token_statistics(dm.token_file, dm.tokenizer),
    }


def _reasons(entry: dict[str, Any]) -> str:
    parts = [f"{k} {v:,}" for k, v in (entry.get("dropped") or {}).items() if v]
    parts += [f"{k} {v:,} redacted" for k, v in (entry.get("redactions") or {}).items() if v]
    if entry.get("clusters"):
        parts.append(f"{entry['clusters']:,} duplicate clusters (largest {entry.get('largest_cluster')})")
    return ", ".join(parts) or "-"


def format_report(report: dict[str, Any]) -> str:
    lines = [f"corpus: {report.get('description') or report.get('dataset')}"]
    steps = report["pipeline"]
    if steps:
        rows = [[e["name"], f"{e['docs_in']:,}", f"{e['docs_out']:,}", bytes_text(e["bytes_in"]), bytes_text(e["bytes_out"]),
                 _reasons(e)] for e in steps]  # fmt: skip
        lines += ["", format_table(["step", "docs in", "docs out", "bytes in", "bytes out", "removed / changed"], rows)]
    else:
        lines.append("no data.pipeline: the text goes to the tokenizer as the dataset gives it")
    t = report["tokens"]
    rows = [["tokens", f"{t['tokens']:,}"], ["documents", f"{t['documents']:,}"]]
    if "bytes_per_token" in t:
        rows.append(["bytes per token", f"{t['bytes_per_token']:.2f} ({bytes_text(t['bytes'])} of text)"])
    split = report["split"]
    rows.append(["train / val tokens", f"{split['train_tokens']:,} / {split['val_tokens']:,}"])
    if "document_tokens" in t:
        d = t["document_tokens"]
        rows.append(["tokens per document", f"mean {d['mean']:,.0f}, median {d['p50']:,.0f}, p90 {d['p90']:,.0f}, "
                     f"p99 {d['p99']:,.0f}, max {d['max']:,}"])  # fmt: skip
    rows.append(["vocabulary used", f"{t['vocab_used']:,} of {t['vocab_size']:,} ({100 * t['vocab_coverage']:.1f}%)"])
    if t.get("unk_rate") is not None:
        rows.append(["unknown-token rate", f"{100 * t['unk_rate']:.3f}%"])
    rows.append(
        ["most frequent tokens' share", ", ".join(f"top {k}: {100 * v:.1f}%" for k, v in t["top_share"].items())]
    )
    rows.append(["most frequent", " ".join(f"'{x['text']}' {100 * x['share']:.1f}%" for x in t["top_tokens"][:6])])
    lines += ["", format_table(["tokens", ""], rows)]
    return "\n".join(lines)


def write_plots(report: dict[str, Any], folder: Path) -> list[Path]:
    """PNG plots (document lengths, rank-frequency, what each step kept); none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from lmforge.atomic import staged_file

    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        path = folder / name
        with staged_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    t = report["tokens"]
    if "document_tokens" in t:
        h = t["document_tokens"]["histogram"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = [f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in zip(h["edges"][:-1], h["edges"][1:])]
        ax.bar(range(len(h["counts"])), h["counts"])
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
        ax.set_xlabel("tokens per document")
        ax.set_ylabel("documents")
        ax.set_title(f"document lengths ({t['documents']:,} documents)", fontsize=9)
        save(fig, "document-lengths.png")
    freq = t["rank_frequency"]
    if freq:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.loglog(range(1, len(freq) + 1), freq)
        ax.set_xlabel("rank")
        ax.set_ylabel("occurrences")
        ax.set_title(f"token rank-frequency ({t['vocab_used']:,} ids used of {t['vocab_size']:,})", fontsize=9)
        save(fig, "rank-frequency.png")
    steps = report["pipeline"]
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = ["input", *(e["name"] for e in steps)]
        docs = [steps[0]["docs_in"], *(e["docs_out"] for e in steps)]
        ax.bar(names, docs)
        ax.bar_label(ax.containers[0], fmt="{:,.0f}")
        ax.set_ylabel("documents kept")
        ax.set_title("documents after each cleaning step", fontsize=9)
        save(fig, "pipeline.png")
    return written


def _instantiate_data(config: Any) -> Any:
    """The config's data module, built as ``fit`` builds it (its class and init_args), and nothing else."""
    import importlib

    data = config.data
    class_path = str(data.class_path if hasattr(data, "class_path") else data["class_path"])
    name = class_path.rsplit(".", 1)[-1]
    if name not in CORPUS_MODULES:
        raise UserError(
            f"data report: data is {class_path}; the report covers pretraining corpora ({', '.join(CORPUS_MODULES)}), "
            "whose text lmforge tokenizes itself"
        )
    module, _, attr = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), attr)
    args = data.init_args
    values = args.as_dict() if hasattr(args, "as_dict") else dict(args)
    return cls(**values)


def data_command(argv: list[str], parse_config: Callable[[list[str]], tuple[Any, str | None]]) -> None:
    """``lmforge data report -c CONFIG [overrides] [--json] [--out DIR]``: prepare the config's corpus as ``fit``
    does and report documents, bytes and tokens through each cleaning step, what was removed and why, document
    lengths and vocabulary coverage (table, JSON, PNG plots). ``parse_config``: how ``fit`` reads a config
    (:func:`lmforge.lightning_cli.parse_fit_config`)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: lmforge data report -c CONFIG [overrides] [--json] [--out DIR]\n\n{DESCRIPTION}")
        return
    if argv[0] != "report":
        raise UserError(f"data: unknown subcommand {argv[0]!r}; the one there is: lmforge data report -c CONFIG")
    parser = OneLineParser(prog="lmforge data report", usage="lmforge data report -c CONFIG [overrides] [--json] "
                           "[--out DIR]", description=DESCRIPTION)  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--out", help="folder for report.json and the PNG plots (default: <default_root_dir>/data)")
    args, rest = parser.parse_known_args(argv[1:])
    if not any(a in ("-c", "--config") or a.startswith("--config=") for a in rest):
        raise UserError("data report: give the run's config (-c configs/gpt-tiny.yaml) and any overrides")
    config, _ = parse_config(rest)
    dm = _instantiate_data(config)
    dm.prepare_data()
    report = build_report(dm)
    out = Path(args.out) if args.out else Path(config.trainer.default_root_dir or ".") / "data"
    from lmforge.atomic import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    plots = write_plots(report, out)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(format_report(report))
    where = [str(out / "report.json"), *(str(p) for p in plots)]
    print(f"\nwrote {', '.join(where)}" + ("" if plots else " (plots need matplotlib: pip install matplotlib)"))
