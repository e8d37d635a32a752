"""The GPU session's summary: ``python benchmarks/harness.py report WORKDIR`` (:func:`session_report`).

It turns the CSVs and logs that ``benchmarks/gpu_session.sh`` leaves in its work folder into the short text
the session returns: the gate's verdict first, the time each step used against its limit, the environment,
then each benchmark's table in short, with lmforge's ratios to the anchors (``harness.ANCHOR_*``, from
ANCHORS.md) and to the providers measured in the same run.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import harness
from harness import (
    ANCHOR_ATTENTION,
    ANCHOR_CE,
    ANCHOR_MASKED,
    ANCHOR_TRAIN,
    MASKED_BARS,
    fmt,
    fmt_tflops,
    format_table,
    short_error,
)


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return None if value is None or math.isnan(value) else value


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def _attention_report(rows: list[dict[str, str]]) -> list[str]:
    """TFLOP/s of lmforge against cuDNN and flash in this run, and ANCHORS.md's cuDNN/flash numbers."""
    table: dict[tuple, dict[str, float]] = {}
    for r in rows:
        key = (int(r["head_dim"]), int(r["seq"]), r["causal"] == "1", r["mode"])
        value = _float(r.get("tflops"))
        if value is not None:
            table.setdefault(key, {})[r["provider"]] = value
    body = []
    for (d, n, causal, mode), got in table.items():
        anchor = ANCHOR_ATTENTION.get((d, n, causal))
        a_flash = a_cudnn = None
        if anchor and mode in ("fwd", "fwd+bwd"):
            a_flash, a_cudnn = (anchor[0], anchor[2]) if mode == "fwd" else (anchor[1], anchor[3])
        ours = got.get("lmforge")
        body.append([
            d, n, "yes" if causal else "no", mode, fmt_tflops(ours), fmt_tflops(got.get("cudnn")), fmt_tflops(got.get("flash")),
            _ratio(ours, got.get("cudnn")), _ratio(ours, got.get("flash")), fmt(a_cudnn), fmt(a_flash),
            _ratio(ours, a_cudnn), _ratio(got.get("cudnn"), a_cudnn),
        ])  # fmt: skip
    headers = ["D", "N", "causal", "mode", "lmforge", "cudnn", "flash", "lmf/cudnn", "lmf/flash", "anchor cuDNN",
               "anchor flash", "lmf/anchor cuDNN", "cudnn/anchor"]  # fmt: skip
    other = sorted({p for got in table.values() for p in got} - {"lmforge", "cudnn", "flash"})
    lines = [format_table(headers, body)]
    lines.append("TFLOP/s (FlashAttention convention); lmf/x = lmforge / x in this run; anchor = ANCHORS.md (H200)")
    if other:
        lines.append(f"also in attn.csv: {', '.join(other)}")
    return lines


def _masked_report(rows: list[dict[str, str]]) -> list[str]:
    table: dict[str, dict[str, float]] = {}
    kinds: dict[str, str] = {}
    for r in rows:
        value = _float(r.get("ms"))
        if value is not None:
            table.setdefault(r["case"], {})[r["provider"]] = value
            kinds[r["case"]] = r.get("kind", "")
    providers = [
        p for p in ("lmforge", "flex", "sdpa-causal-nomask", "sdpa-bool-mask") if any(p in t for t in table.values())
    ]
    body = []
    for case, got in table.items():
        bar = MASKED_BARS.get(kinds[case], "")
        anchor = ANCHOR_MASKED.get(case, {}).get(bar)
        body.append([case, *(fmt(got.get(p), ".3f") for p in providers), bar, _ratio(got.get("lmforge"), got.get(bar)),
                     fmt(anchor, ".2f"), _ratio(got.get("lmforge"), anchor)])  # fmt: skip
    headers = ["case", *providers, "bar", "lmf/bar", "anchor bar ms", "lmf/anchor"]
    return [format_table(headers, body), "ms of forward + backward (below 1: lmforge faster); anchor = ANCHORS.md"]


def _ce_report(rows: list[dict[str, str]]) -> list[str]:
    body = []
    for r in rows:
        shape = (int(r["tokens"]), int(r["hidden"]), int(r["vocab"]))
        ms, transient = _float(r.get("ms")), _float(r.get("transient_mib"))
        anchor = ANCHOR_CE.get(shape, {})
        a_compile, a_liger = anchor.get("torch-compile", (None, None)), anchor.get("liger", (None, None))
        body.append([
            "x".join(map(str, shape)), r["provider"], r.get("status", ""), fmt(ms, ".2f"), fmt(transient, ",.0f"),
            _ratio(ms, a_compile[0]), _ratio(ms, a_liger[0]), _ratio(transient, a_liger[1]),
        ])  # fmt: skip
    headers = ["tokens x hidden x vocab", "provider", "status", "ms", "transient MiB", "ms/anchor compile",
               "ms/anchor liger", "MiB/anchor liger"]  # fmt: skip
    return [format_table(headers, body), "forward + backward; anchor = ANCHORS.md (torch.compile, Liger; H200)"]


def _train_report(rows: list[dict[str, str]]) -> list[str]:
    speeds = {r["provider"]: _float(r.get("tokens_per_s")) for r in rows}
    body = []
    for r in rows:
        speed = _float(r.get("tokens_per_s"))
        anchor = ANCHOR_TRAIN.get("plain-compiled") if r.get("shape") == "gpt2-124m" else None
        body.append([
            r["provider"], r.get("shape", ""), r.get("status", ""), fmt(speed, ",.0f"), r.get("ms_per_step") or "-",
            _ratio(speed, speeds.get("plain-compiled")), _ratio(speed, anchor), r.get("mfu") or "-",
            r.get("peak_memory_mib") or "-", r.get("time_to_first_step_s") or "-", (r.get("error") or "")[:60],
        ])  # fmt: skip
    headers = ["provider", "shape", "status", "tokens/s", "ms/step", "vs plain-compiled", "vs anchor compiled",
               "MFU", "peak MiB", "first step s", "error"]  # fmt: skip
    return [format_table(headers, body), "anchor = ANCHORS.md: plain torch.compile loop, 562,950 tokens/s (H200)"]


def _steps_report(path: Path, budget: str) -> list[str]:
    if not path.exists():
        return ["(no steps.tsv)"]
    with path.open(newline="") as f:
        steps = list(csv.DictReader(f, delimiter="\t"))
    used = sum(int(s.get("used_s") or 0) for s in steps)
    lines = [f"budget {budget} s; the steps used {used} s"]
    lines.append(
        format_table(
            ["step", "limit s", "used s", "status"],
            [[s["step"], s["limit_s"], s["used_s"], s["status"]] for s in steps],
        )
    )
    return lines


def session_report(work: Path, budget: str = "?", dry_run: bool = False) -> str:
    """The summary of a ``gpu_session.sh`` run from its work folder: the gate's verdict first, the budget per
    step, the environment, then each benchmark's table in short with lmforge/anchor ratios."""
    lines: list[str] = []
    if dry_run:
        lines.append("DRY RUN (CPU, tiny shapes): checks the session's plumbing; no number below is a speed claim")
    gate = work / "gate" / "gate_summary.txt"
    lines += gate.read_text().rstrip().splitlines() if gate.exists() else ["GATE: NOT RUN (no gate_summary.txt)"]
    lines += ["", "== steps", *_steps_report(work / "steps.tsv", budget)]
    env = work / "env.log"
    if env.exists():
        facts = [ln for ln in env.read_text().splitlines() if ln.strip() and not ln.startswith("== ")]
        lines += ["", "== environment", *facts[:20]]
    sections = (
        ("attention (attn.csv)", "attn", _attention_report),
        ("masked attention (attn_masked.csv)", "attn_masked", _masked_report),
        ("fused linear + cross-entropy (ce.csv)", "ce", _ce_report),
        ("training step (train.csv)", "train", _train_report),
    )
    for title, stem, report in sections:
        rows = harness.read_csv_rows(work, stem)
        lines += ["", f"== {title}"]
        if not rows:
            lines.append("no rows (see its log in session.tar.gz)")
            continue
        try:
            lines += report(rows)
        except (KeyError, ValueError) as err:  # a CSV of other columns: say so, keep the rest of the report
            lines.append(f"cannot summarise {stem}.csv: {short_error(err)}")
    tiles = work / "tiles.json"
    lines += ["", "== tiles.json: " + ("lmforge's tuned_tiles(); pin_tiles(path) or LMFORGE_ATTN_TILES=path to reuse"
                                      if tiles.exists() else "not written (no lmforge attention measured)")]  # fmt: skip
    memory = harness.read_csv_rows(work, "memory")
    if memory:  # benchmarks/memory.py: lmforge estimate's peak against max_memory_allocated (issue 17's check)
        lines += ["", "== estimated vs measured peak memory (memory.csv)"]
        lines += [f"{r.get('config')}: estimated {r.get('estimated_gib') or '-'} GiB, measured "
                  f"{r.get('measured_gib') or '-'} GiB ({r.get('measured_as') or r.get('error')}), "
                  f"{r.get('difference') or '-'}" for r in memory]  # fmt: skip
    finetune = work / "finetune.log"
    if finetune.exists():
        tail = [ln for ln in finetune.read_text(errors="replace").splitlines() if ln.strip()][-8:]
        lines += ["", "== fine-tune smoke (last lines of finetune.log)", *tail]
    return "\n".join(lines) + "\n"
