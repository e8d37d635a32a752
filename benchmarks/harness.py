"""The shared runner of lmforge's benchmark scripts (``benchmarks/*.py``).

A benchmark script keeps what is its own: its shapes, its candidates (the lmforge kernel and the anchors it
races), its correctness check, its bar and its table's columns. Everything they do alike lives here, so that
all of them measure and report alike:

* the environment: :func:`device_name` (the GPU's name, or the CPU model from ``/proc/cpuinfo``),
  :func:`versions` (python, torch, triton, lightning, lmforge, liger-kernel), :func:`iso_date`, and
  :func:`stamp`, the three together as the columns put on every CSV row; :func:`pick_device` (``--device``),
  :func:`load_average`, :func:`process_max_rss_mib` and :func:`peak_tflops` (a card's dense bf16 peak);
* timing: :func:`timeit` (``triton.testing.do_bench`` on CUDA, a ``time.perf_counter`` loop on CPU; both
  take the warm-up and measurement budgets in milliseconds and return the mean time of one call in ms);
* memory: :func:`peak_memory` and :func:`memory_use` (the extra CUDA memory a call allocates, at its peak and
  still held at its end), :func:`step_memory` (the same from torch.profiler's allocator events on CPU),
  :func:`release` between measurements and :func:`is_oom`;
* reporting: :func:`print_table`, :func:`fmt`, :func:`write_csv` (appends, one header per file),
  :class:`RowWriter` (one row at a time, on disk as soon as it is measured) and the matplotlib (Agg) plots
  :func:`plot_bars`, :func:`plot_lines` and :func:`grouped_bars`, which return False instead of failing when
  matplotlib is not installed;
* being cut short: :func:`catch_interrupts` makes SIGINT and SIGTERM raise KeyboardInterrupt (also where
  the parent left SIGINT ignored), so that a script under ``timeout -s INT`` prints what it measured and
  exits with code 130; the rows it wrote are already on disk;
* the run of a benchmark script: :func:`bench_parser` and :func:`parse_bench_args` (the options every
  script takes: --quick, --dtype, --providers, --no-smoke, --out, --warmup, --rep, --device),
  :func:`bench_main` (interrupts caught, the device picked, the GPU measurement or the CPU checks run),
  :class:`Recorder` (every result kept, written to the CSV and printed as it is measured; the table of what
  was measured when cut short), :func:`measure_and_report` (the GPU run: providers, measurements, table,
  files), :func:`printed_notes`, and the CPU correctness smoke's :func:`smoke_row` and :func:`print_smoke`;
* the anchors, ANCHORS.md's numbers (``ANCHOR_*``), and the GPU session's report:
  ``python benchmarks/harness.py report WORKDIR`` (``session_report.py``) turns the CSVs and logs of
  ``benchmarks/gpu_session.sh`` into the short summary it returns.

This module never imports triton at import time (only :func:`timeit` does, on CUDA), so a script can
still set ``TRITON_INTERPRET=1`` after importing it and before importing its kernels.

The scripts run as ``python benchmarks/<name>.py``, which puts this directory on ``sys.path``, so they
``import harness``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import importlib.metadata
import importlib.util
import math
import os
import platform
import re
import resource
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Dense bf16/fp16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of the device name; first match wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


# -- environment ------------------------------------------------------------------------------------
def as_device(device: torch.device | str | None = None) -> torch.device:
    """``device`` as a torch.device; None means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_device(choice: str) -> torch.device:
    """``--device`` (auto, cuda or cpu) as a torch.device: auto is CUDA when available; cuda without it exits."""
    cuda = torch.cuda.is_available() and choice != "cpu"
    if choice == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device("cuda" if cuda else "cpu")


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


def environment_line(device: torch.device | str | None = None) -> str:
    """``device: <name>; <versions>; <date>``: what a script prints first."""
    return f"device: {device_name(device)}; {format_versions()}; {iso_date()}"


def load_average() -> str:
    """The 1-minute load average: how busy the machine was (other work on the CPU slows and scatters times)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def process_max_rss_mib() -> float:
    """The process's high-water mark of resident memory so far (Linux reports KiB); never decreases."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_tflops(name: str) -> float | None:
    """The dense bf16/fp16 peak of a known GPU by its name, TFLOP/s (:data:`PEAK_TFLOPS`); None if unknown."""
    return next((value for key, value in PEAK_TFLOPS if key in name), None)


# -- timing -----------------------------------------------------------------------------------------
def sync(device: torch.device | str | None = None) -> None:
    """Wait for the GPU's queued work (no-op on CPU)."""
    device = as_device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_grads(tensors: Iterable[torch.Tensor] | None) -> None:
    """``t.grad = None`` for each tensor, so that the next call does not accumulate into (or time) old gradients."""
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
        reset_grads(grad_to_none)
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


# -- memory -----------------------------------------------------------------------------------------
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


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start and stop lines) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_memory_use(fn: Callable[[], object]) -> tuple[int, int] | None:
    """Bytes held through PyTorch's CPU allocator that ``fn()`` allocated: at the peak, and at its end.

    torch.profiler (profile_memory=True) records a "[memory]" event per allocation (+bytes) and free
    (-bytes); their running sum in time order peaks at the first answer and ends at the second. Frees of
    memory allocated before the call are not reported by the profiler, so they do not count. None when
    the profiler gives no events.
    """
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # a torch whose profiler keeps its results elsewhere
        return None
    records = sorted(((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"), key=lambda r: r[0])
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return (peak, live) if records else None


def step_memory(fn: Callable[[], object], device: torch.device) -> tuple[int, int] | None:
    """(peak, kept) extra bytes of one call: :func:`memory_use` on CUDA, :func:`cpu_memory_use` on CPU."""
    return memory_use(fn, device) if device.type == "cuda" else cpu_memory_use(fn)


def release(device: torch.device, *tensors: torch.Tensor) -> None:
    """Drop the gradients of ``tensors`` and free what the last measurement left behind before the next one."""
    reset_grads(tensors)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and re.search(r"out of memory|can't allocate memory", str(err)) is not None
    )


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


def fmt(value: float | None, spec: str = ".1f", missing: str = "-") -> str:
    """``value`` formatted by ``spec``, or ``missing`` when there is none."""
    return missing if value is None else format(value, spec)


def fmt_tflops(value: float | None) -> str:
    """A rate with one decimal from 10 up, three significant digits below; "-" for none."""
    return "-" if value is None else f"{value:.1f}" if value >= 10 else f"{value:.3g}"


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


def read_csv_rows(folder: Path, stem: str) -> list[dict[str, str]]:
    """The rows of ``<stem>.csv`` and its ``<stem>-2.csv``... siblings (see :func:`write_csv`) in ``folder``."""
    rows: list[dict[str, str]] = []
    for path in sorted(folder.glob(f"{stem}*.csv")):
        if re.fullmatch(rf"{re.escape(stem)}(-\d+)?\.csv", path.name):
            with path.open(newline="") as f:
                rows += list(csv.DictReader(f))
    return rows


def replace_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file renamed over it; several processes may
    write the same file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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


# -- plots ------------------------------------------------------------------------------------------
def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt: Any, fig: Any, path: Path | str) -> bool:
    """Lay out ``fig``, save it to ``path`` (120 dpi) and close it; True, for the plot functions to return."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


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
    return save_figure(plt, fig, path)


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
    return save_figure(plt, fig, path)


def grouped_bars(
    ax: Any,
    values: Mapping[str, Sequence[float | str | None]],
    colors: Mapping[str, str],
    label: Callable[[float], str],
    **label_options: Any,
) -> None:
    """Groups of bars on ``ax``, one bar per series (a key of ``values``: its legend label) in each group (the
    position j in the series' values, drawn at x = j). A number is a bar, labelled ``label(value)``; a string
    (a status such as "OOM") is written upright in the bar's place; None leaves the place empty."""
    width = 0.8 / max(1, len(values))
    for i, (series, points) in enumerate(values.items()):
        offset = (i - (len(values) - 1) / 2) * width
        xs, ys = [], []
        for j, value in enumerate(points):
            if isinstance(value, str):
                ax.text(j + offset, 0.02, value, rotation=90, ha="center", va="bottom", fontsize=7,
                        transform=ax.get_xaxis_transform())  # fmt: skip
            elif value is not None:
                xs.append(j + offset)
                ys.append(value)
        bars = ax.bar(xs, ys, width, label=series, color=colors[series])
        ax.bar_label(bars, [label(y) for y in ys], **label_options)


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


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        return []


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers, at least one."""
    if not (values := _ints(text)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers")
    return values


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated positive integers, at least one."""
    values = _ints(text)
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers, e.g. 256,1024")
    return values


def add_out_arg(p: argparse.ArgumentParser, default: str = "benchmarks/out", what: str = "CSV and plot") -> None:
    """--out: the folder the script writes to."""
    p.add_argument("--out", type=Path, default=Path(default), help=f"{what} directory (default {default})")


def add_device_arg(p: argparse.ArgumentParser, help: str = "auto: CUDA when available") -> None:
    """--device auto|cuda|cpu (see :func:`pick_device`)."""
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help=help)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The options every benchmark script takes: --out, --warmup, --rep, --device."""
    add_out_arg(p)
    p.add_argument("--warmup", type=float, default=25, help="warm-up budget per measurement, ms (default 25)")
    p.add_argument("--rep", type=float, default=100, help="timed budget per measurement, ms (default 100)")
    add_device_arg(p, "cpu: the CPU checks even on a GPU machine")


def bench_parser(doc: str, quick: str) -> argparse.ArgumentParser:
    """The parser of a benchmark script: its docstring's first paragraph as the description, and --quick."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=quick)
    return p


def add_bench_args(
    p: argparse.ArgumentParser,
    providers: Sequence[str],
    *,
    default: Sequence[str] | None = None,
    cpu_default: Sequence[str] | None = None,
    dtypes: Sequence[str] = ("bf16", "fp16"),
    smoke: str = "the interpreter correctness smoke (a)",
) -> None:
    """--dtype, --providers (a subset of ``providers``; ``default``, or None when the GPU default is all of them
    and the CPU one ``cpu_default``), --no-smoke, and :func:`add_run_args`."""
    p.add_argument("--dtype", choices=list(dtypes), default="bf16", help="GPU dtype (the CPU checks use fp32)")
    listed = ",".join(providers)
    p.add_argument(
        "--providers",
        type=choice_list(providers),
        default=None if default is None else list(default),
        help=f"comma-separated subset of {listed}"
        + (f" (default: all on GPU, {','.join(cpu_default)} on CPU)" if cpu_default else ""),
    )
    p.add_argument("--no-smoke", action="store_true", help=f"CPU: skip {smoke}")
    add_run_args(p)


def parse_bench_args(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse; ``args.dtype_name`` is --dtype (the CPU checks set it to fp32); --warmup and --rep checked."""
    args = p.parse_args(argv)
    args.dtype_name = args.dtype
    check_run_args(p, args)
    return args


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
    device = pick_device(args.device)
    print(environment_line(device))
    if device.type != "cuda":
        if args.quick:
            args.warmup, args.rep = min(args.warmup, 10), min(args.rep, 50)
        return cpu_main(args)
    return gpu_main(args, device)


def until_interrupted(run: Callable[[], int]) -> int:
    """``run()`` with SIGINT and SIGTERM caught (:func:`catch_interrupts`); cut short before it caught the
    interrupt itself (importing, probing the providers), a line that says so and exit code 130."""
    catch_interrupts()
    try:
        return run()
    except KeyboardInterrupt:
        print("\ninterrupted before any measurement", flush=True)
        return 130


def bench_main(
    parse: Callable[[Sequence[str] | None], argparse.Namespace],
    cpu_main: Callable[[argparse.Namespace], int],
    gpu_main: Callable[[argparse.Namespace, torch.device], int],
    argv: Sequence[str] | None = None,
) -> int:
    """A benchmark script's main: :func:`until_interrupted` of :func:`run_script` of its parsed options."""
    return until_interrupted(lambda: run_script(parse(argv), cpu_main, gpu_main))


# -- the run of a benchmark script ------------------------------------------------------------------
def no_speed_claim(verb: str = "claimed") -> None:
    """What a script says first without CUDA."""
    print(f"no CUDA device: no speed is {verb} (speed claims come only from GPU runs); CPU checks instead")


class Recorder:
    """Every result of one run as it is measured: kept (``results``), written to ``path`` (a CSV row, on disk
    at once) and printed (a line). ``row(result, results)`` and ``line(result, results)`` make them, from the
    results so far (which include this one), for ratios to what was measured before it. ``common``: the
    stamp put on every row (default: :func:`stamp` of the default device); ``preset``: the run's name."""

    def __init__(
        self,
        path: Path,
        row: Callable[[Any, list], Mapping[str, object]],
        line: Callable[[Any, list], str],
        *,
        common: Mapping[str, object] | None = None,
        preset: str = "",
    ) -> None:
        self.results: list = []
        self.writer = RowWriter(path, common=common)
        self.row, self.line, self.preset = row, line, preset

    def add(self, result: Any) -> None:
        self.results.append(result)
        self.writer.write(self.row(result, self.results))
        print(self.line(result, self.results), flush=True)

    def interrupted(self, report: Callable[[list], None]) -> int:
        """Cut short: the table of what was measured (its rows are in the CSV already); exit code 130."""
        print(f"\ninterrupted: {len(self.results)} measurement(s) kept in {self.writer.path}", flush=True)
        if self.results:
            report(self.results)
        return 130

    def until_interrupted(self, run: Callable[[], int], report: Callable[[list], None]) -> int:
        """``run()``, or :meth:`interrupted` when it is cut short."""
        try:
            return run()
        except KeyboardInterrupt:
            return self.interrupted(report)

    def wrote(self) -> bool:
        """Say where the rows went (False, and no file, when nothing was measured)."""
        if not self.results:
            print("nothing was measured; no CSV or plot written")
            return False
        print(f"wrote {self.writer.path} ({self.writer.count} rows)")
        return True


def measure_and_report(
    recorder: Recorder,
    find: Callable[[], Mapping[str, Any]],
    run: Callable[[Mapping[str, Any]], object],
    report: Callable[[list], None],
    write: Callable[[], None],
    cut_report: Callable[[list], None] | None = None,
) -> int:
    """A GPU run: the providers that work here (``find()``; exit code 1 when none does), every measurement
    (``run(providers)``, each result given to ``recorder``), the table (``report(results)``) and the files
    (``write()``). Cut short: the table of what was measured (``cut_report``, default ``report``), code 130."""
    try:
        providers = find()
        if not providers:
            print("no provider is available; nothing to measure")
            return 1
        run(providers)
    except KeyboardInterrupt:
        return recorder.interrupted(cut_report or report)
    print()
    report(recorder.results)
    write()
    return 0


def measured(items: Sequence[Any], results: Sequence[Any], key: Callable[[Any], Any]) -> list:
    """The items (shapes, cases) that have at least one result, in their order."""
    return [item for item in items if any(key(r) == item for r in results)]


def versus(result: Any, results: Sequence[Any], references: Sequence[str], ratio: Callable[..., float | None]) -> str:
    """``, vs X 1.23x`` for each reference X (other than the result's own provider) already measured."""
    pairs = [(ref, ratio(result, results, ref)) for ref in references if ref != result.provider]
    return "".join(f", vs {ref} {x:.2f}x" for ref, x in pairs if x is not None)


def saved_plot(path: Path, plotted: bool) -> bool:
    """Say whether the plot was written."""
    print(f"wrote {path}" if plotted else "matplotlib is not installed, so no plot")
    return plotted


@contextlib.contextmanager
def printed_notes() -> Iterator[list[str]]:
    """A list to collect notes in (a provider skipped, and why), printed as ``note: ...`` lines at the end of
    the block, also when it is cut short."""
    notes: list[str] = []
    try:
        yield notes
    finally:
        for note in notes:
            print(f"note: {note}")


def smoke_row(
    cells: Sequence[object],
    compute: Callable[[], Sequence[torch.Tensor]],
    reference: Callable[[], Sequence[torch.Tensor]],
    *,
    tolerance: float,
    columns: int = 4,
    relative: bool = False,
    describe: Callable[[BaseException], str] | None = None,
) -> list[object]:
    """One row of a correctness smoke: ``cells``, the max abs error of each tensor of ``compute()`` (output,
    gradients) against ``reference()`` (float64), then "pass" when each is at most ``tolerance`` (``relative``:
    times the reference's largest magnitude), else "FAIL". ``compute()`` raising: ``columns`` dashes and
    "FAIL (why)", the error as ``describe`` (default :func:`short_error`) words it."""
    try:
        got = compute()
    except Exception as err:
        return [*cells, *["-"] * columns, f"FAIL ({(describe or short_error)(err)})"]
    expected = reference()
    errors = [(a.double() - b).abs().max().item() for a, b in zip(got, expected)]
    if relative:
        ok = all(e <= tolerance * b.abs().max().item() for e, b in zip(errors, expected))
    else:
        ok = all(e <= tolerance for e in errors)
    return [*cells, *(f"{e:.1e}" for e in errors), "pass" if ok else "FAIL"]


def print_smoke(headers: Sequence[str], rows: Sequence[Sequence[object]], counted: str = "cases") -> bool:
    """The smoke's table and verdict line; True when every row passed."""
    print_table(headers, rows)
    passed = all(row[-1] == "pass" for row in rows)
    print(f"smoke: {'all passed' if passed else 'FAILED'} ({len(rows)} {counted})")
    return passed


# -- anchors and the GPU session's report -----------------------------------------------------------
# ANCHORS.md (one H200, torch 2.11, bf16): what users get today without lmforge, for the report's ratios and
# the scripts' reference columns.
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


def _main(argv: Sequence[str] | None = None) -> int:
    from session_report import session_report  # it imports this module

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
