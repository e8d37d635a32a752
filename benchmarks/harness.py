"""Shared helpers for lmforge's benchmark scripts (``benchmarks/*.py``).

What every benchmark needs, in one place so that all of them measure and report alike:

* the environment: :func:`device_name` (the GPU's name, or the CPU model from ``/proc/cpuinfo``),
  :func:`versions` (python, torch, triton, lightning, lmforge, liger-kernel), :func:`iso_date`, and
  :func:`stamp`, the three together as the columns put on every CSV row;
* timing: :func:`timeit` (``triton.testing.do_bench`` on CUDA, a ``time.perf_counter`` loop on CPU; both
  take the warm-up and measurement budgets in milliseconds and return the mean time of one call in ms)
  and :func:`peak_memory` (the extra CUDA memory a call allocates at its peak);
* reporting: :func:`print_table`, :func:`write_csv` (appends, one header per file), :class:`RowWriter`
  (one row at a time, on disk as soon as it is measured) and the matplotlib (Agg) plots :func:`plot_bars`
  and :func:`plot_lines`, which return False instead of failing when matplotlib is not installed;
* being cut short: :func:`catch_interrupts` makes SIGINT and SIGTERM raise KeyboardInterrupt (also where
  the parent left SIGINT ignored), so that a script under ``timeout -s INT`` prints what it measured and
  exits; the rows it wrote are already on disk;
* the GPU session's report: ``python benchmarks/harness.py report WORKDIR`` (:func:`session_report`) turns
  the CSVs and logs of ``benchmarks/gpu_session.sh`` into the short summary it returns.

This module never imports triton at import time (only :func:`timeit` does, on CUDA), so a script can
still set ``TRITON_INTERPRET=1`` after importing it and before importing its kernels.

The scripts run as ``python benchmarks/<name>.py``, which puts this directory on ``sys.path``, so they
``import harness``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import importlib.util
import math
import platform
import re
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# Distributions reported by versions(), as (column name, module to look for, distribution name).
_PACKAGES = (
    ("triton", "triton", "triton"),
    ("lightning", "lightning", "lightning"),
    ("lmforge", "lmforge", "lmforge"),
    ("liger-kernel", "liger_kernel", "liger-kernel"),
)
VERSION_KEYS = ("python", "torch", *(name for name, _, _ in _PACKAGES))
STAMP_KEYS = ("date", "device_name", *VERSION_KEYS)


# -- environment ------------------------------------------------------------------------------------
def as_device(device: torch.device | str | None = None) -> torch.device:
    """``device`` as a torch.device; None means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name (e.g. "NVIDIA H100 80GB HBM3"), or the CPU's model name on CPU."""
    device = as_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str, distribution: str) -> str:
    """The installed version of a package, "" when it is not installed. Does not import it."""
    if module == "lmforge":  # an editable install's metadata can lag behind the source
        import lmforge

        return lmforge.__version__
    try:
        if importlib.util.find_spec(module) is None:
            return ""
    except (ImportError, ValueError):
        return ""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def versions() -> dict[str, str]:
    """Versions of python, torch, triton, lightning, lmforge and liger-kernel; "" for one not installed.

    The keys are always the same (:data:`VERSION_KEYS`), so CSV files written on different machines share
    their columns.
    """
    found = {"python": platform.python_version(), "torch": torch.__version__}
    found.update({name: _version(module, dist) for name, module, dist in _PACKAGES})
    return found


def format_versions(found: Mapping[str, str] | None = None) -> str:
    """``torch 2.5.1, triton 3.1.0, ...``: the installed ones only."""
    found = versions() if found is None else found
    return ", ".join(f"{name} {version}" for name, version in found.items() if version)


def iso_date() -> str:
    """Local date and time, ISO 8601 to the second (e.g. ``2026-11-27T07:47:12``)."""
    return datetime.datetime.now().isoformat(timespec="seconds")


def stamp(device: torch.device | str | None = None) -> dict[str, str]:
    """The columns put on every CSV row: date, device_name and the versions."""
    return {"date": iso_date(), "device_name": device_name(device), **versions()}


# -- timing -----------------------------------------------------------------------------------------
def sync(device: torch.device | str | None = None) -> None:
    """Wait for the GPU's queued work (no-op on CPU)."""
    device = as_device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_grads(tensors: Iterable[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def _timeit_loop(
    fn: Callable[[], Any],
    warmup: float,
    rep: float,
    grad_to_none: Sequence[torch.Tensor] | None,
    device: torch.device,
    min_rep: int,
) -> float:
    """do_bench's scheme with time.perf_counter: estimate one call, then fill the warm-up and rep budgets."""
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    estimate_ms = max((time.perf_counter() - start) * 1e3, 1e-6)
    for _ in range(max(1, int(warmup / estimate_ms))):
        fn()
    times = []
    for _ in range(max(min_rep, int(rep / estimate_ms))):
        _reset_grads(grad_to_none)
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.fmean(times)


def timeit(
    fn: Callable[[], Any],
    warmup: float = 25,
    rep: float = 100,
    *,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    min_rep: int = 5,
) -> float:
    """Mean milliseconds per call of ``fn``, after warm-up.

    ``warmup`` and ``rep`` are time budgets in ms, as in ``triton.testing.do_bench``: one call is timed
    first, then ``warmup / estimate`` untimed calls and ``rep / estimate`` timed ones (at least one of each).
    ``grad_to_none``: tensors whose ``.grad`` is reset before each timed call (for a backward, so that
    gradient accumulation is not timed). On CUDA this is ``do_bench`` (CUDA events, L2 cache flushed
    before each call); on CPU (or without triton) a ``time.perf_counter`` loop of at least ``min_rep`` timed
    calls, since a budget of one or two calls gives the scatter of a shared CPU.
    """
    device = as_device(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            pass
        else:
            with torch.cuda.device(device):
                ms = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="mean")
            return float(ms)
    return _timeit_loop(fn, warmup, rep, grad_to_none, device, min_rep)


def memory_use(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[int, int] | None:
    """CUDA bytes ``fn()`` allocates (at its peak, and still held when it returns) beyond what was
    allocated before; None on CPU. The difference of the two is the call's transient memory."""
    device = as_device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, torch.cuda.memory_allocated(device) - before


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> int | None:
    """Bytes of CUDA memory ``fn()`` allocates at its peak beyond what was allocated before; None on CPU."""
    use = memory_use(fn, device)
    return None if use is None else use[0]


# -- reporting --------------------------------------------------------------------------------------
_NUMBER = re.compile(r"^[-+]?(\d[\d,]*)?\.?\d+([eE][-+]?\d+)?\s*(%|x|ms|s|GiB|MiB)?$")


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _is_numeric(column: Sequence[str]) -> bool:
    """Right-align a column whose cells are all numbers (placeholders "", "-" and "n/a" aside)."""
    cells = [c for c in column if c not in ("", "-", "n/a", "nan")]
    return bool(cells) and all(_NUMBER.match(c) for c in cells)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """An aligned text table: numbers right-aligned, text left-aligned, a rule under the header."""
    body = [[_cell(v) for v in row] for row in rows]
    columns = list(zip(*body)) if body else [() for _ in headers]
    widths = [max([len(h), *(len(c) for c in col)]) for h, col in zip(headers, columns)]
    right = [_is_numeric(col) for col in columns]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "  ".join(parts).rstrip()

    head = line(list(headers))
    rule = "-" * max(len(head), sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([head, rule, *(line(cells) for cells in body)])


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print :func:`format_table`. Cells may be str (shown as is), int (with thousands separators),
    float (3 decimals) or None (empty); format numbers yourself for other precisions."""
    print(format_table(headers, rows), flush=True)


def _csv_header(path: Path) -> list[str] | None:
    try:
        with path.open(newline="") as f:
            return next(csv.reader(f), None)
    except OSError:
        return None


def _free_csv_path(path: Path, fields: list[str]) -> Path:
    """``path``, or ``<stem>-2.csv``, ``-3``...: the first that is new or already has exactly these columns."""
    candidate, n = path, 1
    while candidate.exists() and _csv_header(candidate) != fields:
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def write_csv(
    path: Path | str,
    rows: Sequence[Mapping[str, object]],
    *,
    common: Mapping[str, object] | None = None,
    fields: Sequence[str] | None = None,
) -> Path:
    """Append ``rows`` to the CSV file ``path``, writing the header first when the file is new.

    Every row gets the ``common`` columns: date, device name and versions, :func:`stamp` of the default
    device when not given. ``fields``: the columns, in order; common keys that are not among them are left out, a
    row key that is not among them is an error. Default: date and device_name, the rows' keys in order,
    then the versions. A file that exists with other columns is left alone: the rows go to ``<stem>-2.csv``
    (or -3, ...) instead, with a note. Returns the path written.
    """
    path = Path(path)
    extra = stamp() if common is None else dict(common)
    if fields is None:
        keys = dict.fromkeys(k for row in rows for k in row if k not in extra)
        head = [k for k in ("date", "device_name") if k in extra]
        fields = [*head, *keys, *(k for k in extra if k not in head)]
    fields = list(fields)
    unknown = sorted({k for row in rows for k in row} - set(fields))
    if unknown:
        raise ValueError(f"write_csv({path}): columns not in fields: {', '.join(unknown)}")
    target = _free_csv_path(path, fields)
    if target != path:
        print(f"note: {path} has other columns; writing to {target} instead", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    is_new = not target.exists()
    with target.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if is_new:
            writer.writeheader()
        writer.writerows({**extra, **row} for row in rows)
    return target


class RowWriter:
    """Appends rows to one CSV file as they are measured, each on disk when :meth:`write` returns.

    The columns are fixed by the first row (or ``fields``), as :func:`write_csv` chooses them, so later rows
    go to the same file; ``common``: as for :func:`write_csv` (default: :func:`stamp` of the default device,
    taken once; its date is renewed for every row). ``path`` after a write is the file actually written
    (see :func:`write_csv`)."""

    def __init__(
        self, path: Path | str, *, common: Mapping[str, object] | None = None, fields: Sequence[str] | None = None
    ) -> None:
        self.path = Path(path)
        self.common = dict(stamp() if common is None else common)
        self.fields = list(fields) if fields is not None else None
        self.count = 0

    def write(self, row: Mapping[str, object]) -> Path:
        if self.fields is None:
            head = [k for k in ("date", "device_name") if k in self.common]
            keys = [k for k in row if k not in self.common]
            self.fields = [*head, *keys, *(k for k in self.common if k not in head)]
        if "date" in self.common:
            self.common["date"] = iso_date()  # when this row was measured
        self.path = write_csv(self.path, [row], common=self.common, fields=self.fields)
        self.count += 1
        return self.path


_interrupted_by: str | None = None  # the signal's name, once catch_interrupts' handler ran


def interrupted_by() -> str | None:
    """ "SIGINT" or "SIGTERM" once such a signal arrived (with :func:`catch_interrupts`), else None: tells a
    KeyboardInterrupt that a library turned into something else (Lightning exits with SystemExit(1))."""
    return _interrupted_by


def catch_interrupts() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread from now on.

    Python leaves SIGINT ignored when its parent started it so (a non-interactive shell's background job),
    and SIGTERM would end it without a word: under ``timeout -s INT`` (or a TERM), the scripts catch the
    KeyboardInterrupt, print the table of what they measured and exit, their rows already written."""

    def interrupt(signum: int, frame: object) -> None:
        global _interrupted_by
        _interrupted_by = signal.Signals(signum).name
        raise KeyboardInterrupt(_interrupted_by)

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_bars(
    path: Path | str,
    values: Mapping[str, float],
    *,
    ylabel: str,
    title: str,
    colors: Sequence[str] | None = None,
    fmt: str = "{:,.0f}",
    figsize: tuple[float, float] = (5, 3.5),
) -> bool:
    """A labelled bar per key of ``values``, saved to ``path``; False when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=figsize)
    bars = ax.bar(list(values), list(values.values()), color=list(colors)[: len(values)] if colors else None)
    ax.bar_label(bars, fmt=fmt)
    ax.margins(y=0.15)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_lines(
    path: Path | str,
    panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = True,
    ncols: int = 2,
) -> bool:
    """One panel per key of ``panels`` (its title), one line per series (label -> [(x, y), ...]), shared
    legend; saved to ``path``. False when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    ncols = max(1, min(ncols, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    labels = list(dict.fromkeys(label for series in panels.values() for label in series))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # a series keeps its colour in every panel
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (panel, series) in zip(axes.flat, panels.items()):
        xs = sorted({x for points in series.values() for x, _ in points})
        for label, points in series.items():
            points = sorted(points)
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label, color=colors[label])
        if logx:
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -- command line -----------------------------------------------------------------------------------
def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated subset of ``choices``."""

    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [x for x in items if x not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(choices)}"
            )
        return items

    return parse


def slug(text: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``: for file names."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def short_error(err: BaseException, limit: int = 160) -> str:
    """``Type: first line`` of an error, without PyTorch's "(Triggered internally at ...)", shortened."""
    lines = str(err).strip().splitlines()
    first = re.sub(r"\s*\(Triggered internally at .*", "", lines[0] if lines else "")
    text = f"{type(err).__name__}: {first}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The options every benchmark script takes: --out, --warmup, --rep, --device."""
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks/out"), help="CSV and plot directory (default benchmarks/out)"
    )
    p.add_argument("--warmup", type=float, default=25, help="warm-up budget per measurement, ms (default 25)")
    p.add_argument("--rep", type=float, default=100, help="timed budget per measurement, ms (default 100)")
    p.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="cpu: the CPU checks even on a GPU machine"
    )


def check_run_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.warmup <= 0 or args.rep <= 0:
        p.error("--warmup and --rep must be positive")


def run_script(
    args: argparse.Namespace,
    cpu_main: Callable[[argparse.Namespace], int],
    gpu_main: Callable[[argparse.Namespace, torch.device], int],
) -> int:
    """Pick the device from --device, print it with the versions and date, and run the GPU measurement or
    the CPU checks (with shorter budgets under --quick)."""
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if cuda else "cpu")
    print(f"device: {device_name(device)}; {format_versions()}; {iso_date()}")
    if not cuda:
        if args.quick:
            args.warmup, args.rep = min(args.warmup, 10), min(args.rep, 50)
        return cpu_main(args)
    return gpu_main(args, device)


# -- the GPU session's report -----------------------------------------------------------------------
# ANCHORS.md (one H200, torch 2.11, bf16): what users get today without lmforge, for the report's ratios.
# Attention, B*N = 16384, H*D = 2048: (D, N, causal) -> TFLOP/s of flash fwd, flash fwd+bwd, cuDNN fwd, cuDNN fwd+bwd.
ANCHOR_ATTENTION = {
    (64, 1024, False): (287.5, 231.9, 426.0, 381.7),
    (64, 1024, True): (213.3, 168.0, 333.1, 270.9),
    (64, 4096, False): (300.9, 275.3, 450.5, 437.5),
    (64, 4096, True): (281.9, 246.0, 420.6, 388.1),
    (64, 16384, False): (309.1, 292.7, 459.0, 448.4),
    (64, 16384, True): (299.2, 279.3, 439.0, 433.1),
    (128, 1024, False): (329.5, 251.3, 580.5, 460.1),
    (128, 1024, True): (248.3, 187.0, 441.0, 344.4),
    (128, 4096, False): (347.3, 305.3, 616.5, 543.4),
    (128, 4096, True): (306.2, 266.4, 548.2, 482.6),
    (128, 16384, False): (351.3, 317.5, 644.1, 555.2),
    (128, 16384, True): (323.5, 313.7, 579.6, 557.8),
}
# Linear + cross-entropy, forward + backward: (tokens, hidden, vocab) -> provider -> (ms, MiB)
ANCHOR_CE = {
    (8192, 768, 50257): {"torch-eager": (20.8, 4626), "torch-compile": (4.44, 1572), "liger": (26.4, 12)},
    (8192, 4096, 128256): {"torch-eager": (47.7, 10958), "torch-compile": (40.3, 2004), "liger": (53.9, 63)},
}
# GPT-2 124M training step, B=32, T=1024, bf16: provider -> tokens/s
ANCHOR_TRAIN = {"plain-eager": 380_634.0, "plain-compiled": 562_950.0}
# Masked attention, forward + backward, H=16, D=128: case -> provider -> ms
ANCHOR_MASKED = {
    "packed 2x8192 doc512": {"sdpa-causal-nomask": 3.85, "sdpa-bool-mask": 12.19, "flex": 0.83},
    "packed 1x16384 doc2048": {"sdpa-causal-nomask": 7.22, "sdpa-bool-mask": 25.18, "flex": 2.72},
    "padding 8x2048 valid1344": {"sdpa-causal-nomask": 1.16, "sdpa-bool-mask": 3.27, "flex": 1.67},
}
MASKED_BARS = {"packed": "flex", "padding": "sdpa-causal-nomask"}


def read_csv_rows(folder: Path, stem: str) -> list[dict[str, str]]:
    """The rows of ``<stem>.csv`` and its ``<stem>-2.csv``... siblings (see :func:`write_csv`) in ``folder``."""
    rows: list[dict[str, str]] = []
    for path in sorted(folder.glob(f"{stem}*.csv")):
        if re.fullmatch(rf"{re.escape(stem)}(-\d+)?\.csv", path.name):
            with path.open(newline="") as f:
                rows += list(csv.DictReader(f))
    return rows


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return None if value is None or math.isnan(value) else value


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def _num(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _tflops(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value >= 10 else f"{value:.3g}"


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
            d, n, "yes" if causal else "no", mode, _tflops(ours), _tflops(got.get("cudnn")), _tflops(got.get("flash")),
            _ratio(ours, got.get("cudnn")), _ratio(ours, got.get("flash")), _num(a_cudnn), _num(a_flash),
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
        body.append([case, *(_num(got.get(p), ".3f") for p in providers), bar, _ratio(got.get("lmforge"), got.get(bar)),
                     _num(anchor, ".2f"), _ratio(got.get("lmforge"), anchor)])  # fmt: skip
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
            "x".join(map(str, shape)), r["provider"], r.get("status", ""), _num(ms, ".2f"), _num(transient, ",.0f"),
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
            r["provider"], r.get("shape", ""), r.get("status", ""), _num(speed, ",.0f"), r.get("ms_per_step") or "-",
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
        rows = read_csv_rows(work, stem)
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
    finetune = work / "finetune.log"
    if finetune.exists():
        tail = [ln for ln in finetune.read_text(errors="replace").splitlines() if ln.strip()][-8:]
        lines += ["", "== fine-tune smoke (last lines of finetune.log)", *tail]
    return "\n".join(lines) + "\n"


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the GPU session's report (benchmarks/gpu_session.sh)")
    sub = p.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="print the summary of a session's work folder")
    report.add_argument("work", type=Path)
    report.add_argument("--budget", default="?")
    report.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    print(session_report(args.work, args.budget, args.dry_run), end="")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
