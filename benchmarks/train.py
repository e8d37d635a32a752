"""Training throughput of lmforge's GPT: plain PyTorch loops against lmforge's Lightning loop.

The question: what does a user gain (or lose) by training with lmforge (``lightning.Trainer`` driving
``PretrainModule``, with or without lmforge's kernels, with or without ``torch.compile``) instead of the
bare PyTorch loop they would write themselves, eager or compiled?

Providers, run one after another in one process on the same device, on the same random tokens, from the
same initial weights (those ``GPT`` gets under ``--seed``; the lmforge providers have them copied in when the
fit starts, whatever order lmforge initialises in, unless ``--own-init``):

* ``plain-eager``: a loop written here: ``lmforge.model.GPT`` with ``attention="torch", loss="torch"``
  (SDPA and ``cross_entropy`` on the full logits), ``torch.optim.AdamW`` (``fused=True`` on CUDA; lr 6e-4,
  betas 0.9/0.95, weight decay 0.1 on the linear layers' matrices only), and per step
  ``loss = model(x, y)``, ``backward``, ``clip_grad_norm_(1.0)``, ``step``, ``zero_grad(set_to_none=True)``,
  under bf16 autocast on CUDA.
* ``plain-compiled``: the same loop after ``model.compile()`` (in place). On GPU this is the anchor to beat
  (``ANCHORS.md``: GPT-2 124M, B=32, T=1024, bf16, one H200: 562,950 tokens/s).
* ``lmforge-<kernels>-<compile>``: ``lmforge.pretrain.PretrainModule`` fitted by ``lightning.Trainer`` (no
  logger, checkpoints, progress bar or model summary; ``gradient_clip_val=1.0``; ``bf16-mixed`` on CUDA,
  ``32-true`` on CPU) over a DataLoader of whole batches held in memory (no collation, no workers).
  ``<kernels>`` is ``torch`` (``attention="torch", loss="torch"``: the plain loop's model) or ``kernels``
  (``attention="auto", loss="auto"``: lmforge's Triton kernels where they run; on CPU ``auto`` means SDPA
  and a chunked torch cross-entropy). ``<compile>`` is ``eager`` or ``compiled`` (``PretrainModule(...,
  compile=True)``, or ``compile={"backend": ...}`` for another ``--compile-backend``). The module gets the
  plain loop's optimizer (the ``adamw`` plugin, same arguments) and a constant LR schedule, so with the
  same model both loops compute the same updates: everything else Lightning and the module do per step
  (the loop and its hooks, the module's ``training_step`` and ``on_before_optimizer_step``, the scheduler,
  the DataLoader) is what is measured against the plain loop.

Measured per provider:

* tokens/s and ms/step over a timed steady-state window: ``--warmup`` untimed steps first, then ``--steps``
  timed ones, ``time.perf_counter`` at the same point of every step (after the optimizer step; from a
  Callback's ``on_train_batch_end`` for Lightning), CUDA synchronised at both ends of the window; the
  median single step too (less moved by other work on a shared CPU; host time on CUDA);
* MFU on GPUs with a known bf16 dense peak (H100/H200 989 TFLOP/s): ``tokens/s * (6*N + 12*L*d*T) / peak``;
  "n/a" elsewhere;
* peak memory: ``torch.cuda.max_memory_allocated`` (reset at the provider's start) on CUDA; "n/a" on CPU,
  where only the process-wide high-water mark of resident memory (``ru_maxrss``, never decreasing) is
  recorded, as ``process_max_rss_mib``;
* time to first step: from the provider's start (model build, compile set-up, Trainer start-up) to the end
  of the first optimizer step, compilation included. Each provider that compiles (torch.compile, or lmforge's
  Triton kernels on CUDA) runs with empty on-disk inductor and Triton caches (``--compile-caches`` keeps
  them), and a toy function is compiled before the first provider, so that the compiled providers' times
  compare: each compiles its own graphs, none pays alone for importing the compiler;
* the loss of the last step, a check that the providers trained alike (plain-eager and lmforge-torch-eager
  compute the same updates), and for compiled providers the graphs and graph breaks dynamo counted.

A provider that fails (compile unavailable, a kernel that does not build, out of memory) gets a row with
its error and the run goes on. ``--repeats`` runs every provider again, interleaved, and the summary shows
the median.

Results: a table on stdout with each provider's ratio to plain-eager and to plain-compiled, one CSV row per
provider and repeat appended to ``<out>/train.csv`` (flushed as soon as it is measured), and a bar plot
``<out>/train_<shape>_<device>.png`` (skipped with a note when matplotlib is missing). Cut short (SIGINT,
SIGTERM, e.g. ``timeout -s INT``), the provider running gets a row with status "interrupted", the table of
what was measured is printed and the script exits with code 130.

    python benchmarks/train.py --quick --compile-backend aot_eager     # CI smoke test, seconds, no number
    python benchmarks/train.py                                          # gpt2-124m on CUDA, anchor on CPU
    python benchmarks/train.py --preset gpt-tiny --providers plain-eager,lmforge-torch-eager --steps 100 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import harness
import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lmforge.model import GPT, GPTConfig
from lmforge.optim import param_groups
from lmforge.pretrain import PretrainModule


@dataclass(frozen=True)
class Provider:
    """One way of training the model."""

    name: str
    loop: str  # "plain" or "lmforge"
    kernels: bool  # attention/loss "auto" (lmforge's kernels where they run) instead of "torch"
    compiled: bool

    @property
    def backends(self) -> str:
        return "auto" if self.kernels else "torch"


PROVIDER_LIST = [
    Provider("plain-eager", "plain", False, False),
    Provider("plain-compiled", "plain", False, True),
    Provider("lmforge-torch-eager", "lmforge", False, False),
    Provider("lmforge-torch-compiled", "lmforge", False, True),
    Provider("lmforge-kernels-eager", "lmforge", True, False),
    Provider("lmforge-kernels-compiled", "lmforge", True, True),
]
PROVIDERS = {p.name: p for p in PROVIDER_LIST}
GROUPS = {
    "all": list(PROVIDERS),
    "plain": [p.name for p in PROVIDER_LIST if p.loop == "plain"],
    "lmforge": [p.name for p in PROVIDER_LIST if p.loop == "lmforge"],
    "eager": [p.name for p in PROVIDER_LIST if not p.compiled],
    "compiled": [p.name for p in PROVIDER_LIST if p.compiled],
}
PRESETS = {
    "anchor": {"layers": 4, "width": 256, "heads": 4, "batch": 8, "seq": 256, "vocab": 320},
    "gpt-small": {"layers": 6, "width": 384, "heads": 6, "batch": 16, "seq": 256, "vocab": 320},
    "gpt-tiny": {"layers": 2, "width": 128, "heads": 4, "batch": 16, "seq": 128, "vocab": 320},
    "gpt2-124m": {"layers": 12, "width": 768, "heads": 12, "batch": 32, "seq": 1024, "vocab": 50304},
    "quick": {"layers": 2, "width": 64, "heads": 2, "batch": 4, "seq": 64, "vocab": 320},
}
# the optimizer of both loops (the adamw plugin's defaults), and a schedule that leaves its lr alone
OPTIMIZER = {"name": "adamw", "lr": 6e-4, "weight_decay": 0.1, "betas": [0.9, 0.95]}
SCHEDULER = {"name": "constant", "warmup_steps": 0}
CSV_FIELDS = [
    "date",
    "provider",
    "status",
    "loop",
    "attention",
    "loss",
    "compile",
    "compile_backend",
    "shape",
    "repeat",
    "params",
    "layers",
    "width",
    "heads",
    "batch",
    "seq",
    "vocab",
    "device",
    "device_name",
    "precision",
    "threads",
    "load_average",
    "warmup",
    "steps",
    "seconds",
    "ms_per_step",
    "median_ms_per_step",
    "tokens_per_s",
    "mfu",
    "peak_memory_mib",
    "process_max_rss_mib",
    "time_to_first_step_s",
    "final_loss",
    "graphs",
    "graph_breaks",
    "compiled_with",
    "error",
    "note",
    "torch",
    "triton",
    "lightning",
    "lmforge",
]


@dataclass
class Shape:
    """The model and batch being measured."""

    name: str
    layers: int
    width: int
    heads: int
    batch: int
    seq: int
    vocab: int

    def config(self, backends: str = "torch") -> GPTConfig:
        return GPTConfig(
            vocab_size=self.vocab,
            block_size=self.seq,
            n_layer=self.layers,
            n_head=self.heads,
            n_embd=self.width,
            attention=backends,
            loss=backends,
        )

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq


@dataclass
class Measurement:
    """One run of one provider: perf_counter at the start of its timed window and after each timed step."""

    provider: Provider
    repeat: int = 0
    params: int = 0
    marks: list[float] = field(default_factory=list)
    time_to_first_step: float | None = None
    peak_memory: int | None = None  # CUDA bytes
    final_loss: float | None = None
    graphs: int | None = None
    graph_breaks: int | None = None
    compiled_with: str = ""
    note: str = ""
    threads: int = 0
    load_average: str = ""
    error: str = ""
    interrupted: bool = False  # cut short by SIGINT/SIGTERM: the run stops after this provider's row

    @property
    def ok(self) -> bool:
        return not self.error and self.steps > 0

    @property
    def steps(self) -> int:
        return max(0, len(self.marks) - 1)

    @property
    def seconds(self) -> float:
        return self.marks[-1] - self.marks[0]

    def tokens_per_s(self, shape: Shape) -> float:
        return self.steps * shape.tokens_per_step / self.seconds

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.seconds / self.steps

    @property
    def median_ms_per_step(self) -> float:
        return 1000 * statistics.median(b - a for a, b in pairwise(self.marks))


# -- environment ------------------------------------------------------------------------------------
def peak_flops(name: str) -> float | None:
    """The bf16 dense peak of a known GPU in FLOP/s (harness.PEAK_TFLOPS), else None."""
    tflops = harness.peak_tflops(name)
    return None if tflops is None else tflops * 1e12


def flops_per_token(shape: Shape, params: int) -> float:
    return 6 * params + 12 * shape.layers * shape.width * shape.seq


def quiet_lightning() -> None:
    """Keep Lightning's start-up banners and expected warnings out of the report."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning 2.6 on torch 2.13


def fresh_start(device: torch.device) -> None:
    """Between providers: drop the previous one's memory and compiled graphs, zero dynamo's counters."""
    gc.collect()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def warm_compiler(backend: str) -> str:
    """Compile a toy function once before the first compiled provider, so that it does not pay alone for
    importing and setting up the compiler. Returns the error, "" when the toy compiled."""
    try:
        x = torch.ones(4, requires_grad=True)
        torch.compile(lambda t: (t * 2).sin().sum(), backend=backend)(x).backward()
    except Exception as err:  # noqa: BLE001 - the compiled providers will report it
        return harness.short_error(err)
    finally:
        torch._dynamo.reset()
    return ""


def fresh_compile_cache() -> contextlib.AbstractContextManager:
    """Empty on-disk caches for inductor and Triton while a provider runs (``torch._inductor.utils.fresh_cache``:
    a new temporary TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR, in-memory caches cleared), so that it compiles
    everything it needs itself, as on a first run, instead of finding what an earlier provider or run left."""
    try:
        from torch._inductor import utils
    except ImportError:
        return contextlib.nullcontext()
    fresh = getattr(utils, "fresh_cache", None) or getattr(utils, "fresh_inductor_cache", None)
    return fresh() if fresh is not None else contextlib.nullcontext()


def compile_facts(result: Measurement, backend: str) -> None:
    """What dynamo counted while the provider ran: graphs, graph breaks, and which compiler ran them."""
    counters = torch._dynamo.utils.counters
    result.graphs = int(counters["stats"].get("unique_graphs", 0))
    result.graph_breaks = int(sum(counters["graph_break"].values()))
    if not result.graphs:
        result.compiled_with = "nothing compiled"
    elif counters["inductor"]:
        result.compiled_with = "inductor"
    else:
        result.compiled_with = backend if backend != "inductor" else "not inductor"


# -- data -------------------------------------------------------------------------------------------
@dataclass
class Batches:
    """(num_steps, B, T) inputs and next-token targets, the same for every provider, in CPU memory."""

    x: Tensor
    y: Tensor

    @classmethod
    def random(cls, shape: Shape, num_steps: int, seed: int) -> Batches:
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, shape.vocab, (num_steps, shape.batch, shape.seq + 1), generator=generator)
        return cls(tokens[..., :-1].contiguous(), tokens[..., 1:].contiguous())


class BatchDataset(Dataset):
    """Item i is the whole batch i: a DataLoader with ``batch_size=None`` serves it without collating."""

    def __init__(self, batches: Batches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.batches.x[i], self.batches.y[i]


# -- providers --------------------------------------------------------------------------------------
def plain_adamw(model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """torch's AdamW with the adamw plugin's arguments: weight decay on the matrices of linear layers only
    (not on embeddings, so not on a tied output head, nor on norms and biases)."""
    return torch.optim.AdamW(
        param_groups(model, OPTIMIZER["weight_decay"]),
        lr=OPTIMIZER["lr"],
        betas=tuple(OPTIMIZER["betas"]),
        fused=True if device.type == "cuda" else None,
    )


def run_plain(
    provider: Provider,
    shape: Shape,
    batches: Batches,
    args: argparse.Namespace,
    device: torch.device,
    result: Measurement,
) -> None:
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = GPT(shape.config(provider.backends)).to(device)
    model.train()
    result.params = model.num_parameters()
    if provider.compiled:
        model.compile(backend=args.compile_backend)
    optimizer = plain_adamw(model, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    loss = None

    def step(i: int) -> Tensor:
        x = batches.x[i].to(device, non_blocking=True)
        y = batches.y[i].to(device, non_blocking=True)
        with autocast:
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    last = args.warmup + args.steps
    for i in range(last):
        if i == args.warmup:
            harness.sync(device)
            result.marks.append(time.perf_counter())
        loss = step(i)
        if i == 0:
            harness.sync(device)
            result.time_to_first_step = time.perf_counter() - start
        if i >= args.warmup:
            if i == last - 1:
                harness.sync(device)
            result.marks.append(time.perf_counter())
    result.threads = torch.get_num_threads()
    result.final_loss = float(loss)


class StepTimer(L.Callback):
    """perf_counter after the first optimizer step (time to first step) and after steps ``warmup`` to
    ``warmup + steps`` (the timed window); CUDA synchronised at each of them except inside the window.

    With ``weights`` (a state dict), copies them into the module's model when the fit starts (after
    ``configure_model`` has built, placed and wrapped it), so that every provider starts from the very same
    weights whatever order lmforge initialises in; the copy's time is left out of the time to first step."""

    def __init__(
        self,
        warmup: int,
        steps: int,
        device: torch.device,
        start: float,
        result: Measurement,
        weights: dict[str, Tensor] | None = None,
    ) -> None:
        self.first, self.last = warmup, warmup + steps
        self.device, self.start, self.result, self.weights = device, start, result, weights
        self.excluded = 0.0
        self.loss: Tensor | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.weights is None:
            return
        began = time.perf_counter()
        model = pl_module.model
        model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
        try:
            with torch.no_grad():
                model.load_state_dict(self.weights)
        except (RuntimeError, KeyError) as err:
            self.result.note = f"reference weights not loaded: {harness.short_error(err)}"
        harness.sync(self.device)
        self.excluded = time.perf_counter() - began

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, *args: object) -> None:
        step = trainer.global_step
        if step in (1, self.first, self.last):
            harness.sync(self.device)
        if step == 1:
            self.result.time_to_first_step = time.perf_counter() - self.start - self.excluded
        if self.first <= step <= self.last:
            self.result.marks.append(time.perf_counter())
        if step == self.last:
            self.loss = outputs["loss"].detach() if isinstance(outputs, dict) else None
            self.result.threads = torch.get_num_threads()


def lmforge_compile_arg(provider: Provider, backend: str) -> bool | dict:
    """PretrainModule's ``compile``: True for torch.compile's default backend, else its kwargs."""
    if not provider.compiled:
        return False
    return True if backend == "inductor" else {"backend": backend}


def run_lmforge(
    provider: Provider,
    shape: Shape,
    batches: Batches,
    args: argparse.Namespace,
    device: torch.device,
    result: Measurement,
) -> None:
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    module = PretrainModule(
        config=shape.config(provider.backends),
        optimizer=dict(OPTIMIZER),
        scheduler=dict(SCHEDULER),
        compile=lmforge_compile_arg(provider, args.compile_backend),
    )
    loader = DataLoader(BatchDataset(batches), batch_size=None, shuffle=False)
    timer = StepTimer(args.warmup, args.steps, device, start, result, args.reference_weights)
    trainer = L.Trainer(
        max_steps=args.warmup + args.steps,
        accelerator=device.type,
        devices=1,
        precision=precision(device),
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        result.params = module.model.num_parameters()  # as trained (after configure_model)
    if timer.loss is not None:
        result.final_loss = float(timer.loss)


def reference_weights(shape: Shape, seed: int) -> dict[str, Tensor]:
    """The initial weights of the plain loop's model (on CPU), for the lmforge providers to start from."""
    torch.manual_seed(seed)
    return GPT(shape.config()).state_dict()


RUNNERS: dict[str, Callable[..., None]] = {"plain": run_plain, "lmforge": run_lmforge}


def run_provider(
    provider: Provider, repeat: int, shape: Shape, batches: Batches, args: argparse.Namespace, device: torch.device
) -> Measurement:
    """One run of one provider; an error is recorded in the result, never raised."""
    fresh_start(device)
    result = Measurement(provider, repeat)
    compiles = provider.compiled or (provider.kernels and device.type == "cuda")  # inductor's or lmforge's Triton
    try:
        with fresh_compile_cache() if compiles and not args.compile_caches else contextlib.nullcontext():
            RUNNERS[provider.loop](provider, shape, batches, args, device, result)
        if len(result.marks) != args.steps + 1:
            raise RuntimeError(f"timed {len(result.marks) - 1} steps instead of {args.steps}")
    except Exception as err:  # noqa: BLE001 - a failing provider is a result, the run goes on
        result.error = harness.short_error(err, 300)
    except (KeyboardInterrupt, SystemExit) as err:  # Lightning turns a KeyboardInterrupt into SystemExit(1)
        if isinstance(err, SystemExit) and harness.interrupted_by() is None:
            raise
        result.error = f"interrupted ({harness.interrupted_by() or 'KeyboardInterrupt'})"
        result.interrupted = True
    if device.type == "cuda":
        harness.sync(device)
        result.peak_memory = torch.cuda.max_memory_allocated(device)
    if provider.compiled:
        compile_facts(result, args.compile_backend)
    result.load_average = harness.load_average()
    return result


# -- report -----------------------------------------------------------------------------------------
def shape_label(shape: Shape) -> str:
    return f"{shape.name} (L{shape.layers} d{shape.width} h{shape.heads} B{shape.batch}xT{shape.seq} V{shape.vocab})"


def precision(device: torch.device) -> str:
    return "bf16-mixed" if device.type == "cuda" else "32-true"


def csv_row(r: Measurement, shape: Shape, args: argparse.Namespace, device: torch.device, peak: float | None) -> dict:
    p = r.provider
    row = {
        "provider": p.name,
        "status": "ok" if r.ok else "interrupted" if r.interrupted else "error",
        "loop": p.loop,
        "attention": p.backends,
        "loss": p.backends,
        "compile": "yes" if p.compiled else "no",
        "compile_backend": args.compile_backend if p.compiled else "",
        "shape": shape.name,
        "repeat": r.repeat,
        "params": r.params or "",
        "layers": shape.layers,
        "width": shape.width,
        "heads": shape.heads,
        "batch": shape.batch,
        "seq": shape.seq,
        "vocab": shape.vocab,
        "device": device.type,
        "precision": precision(device),
        "threads": r.threads or torch.get_num_threads(),
        "load_average": r.load_average,
        "warmup": args.warmup,
        "steps": r.steps,
        "peak_memory_mib": f"{r.peak_memory / 2**20:.1f}" if r.peak_memory is not None else "n/a",
        "process_max_rss_mib": f"{harness.process_max_rss_mib():.1f}",
        "time_to_first_step_s": f"{r.time_to_first_step:.3f}" if r.time_to_first_step is not None else "",
        "final_loss": f"{r.final_loss:.5f}" if r.final_loss is not None else "",
        "graphs": "" if r.graphs is None else r.graphs,
        "graph_breaks": "" if r.graph_breaks is None else r.graph_breaks,
        "compiled_with": r.compiled_with,
        "error": r.error,
        "note": r.note,
    }
    if r.ok:
        speed = r.tokens_per_s(shape)
        row.update(
            seconds=f"{r.seconds:.4f}",
            ms_per_step=f"{r.ms_per_step:.3f}",
            median_ms_per_step=f"{r.median_ms_per_step:.3f}",
            tokens_per_s=f"{speed:.1f}",
            mfu=f"{speed * flops_per_token(shape, r.params) / peak:.4f}" if peak else "n/a",
        )
    return row


@dataclass
class Summary:
    """A provider over its repeats: medians of the successful runs, or its last error."""

    provider: Provider
    runs: list[Measurement]
    shape: Shape

    @property
    def good(self) -> list[Measurement]:
        return [r for r in self.runs if r.ok]

    @property
    def error(self) -> str:
        return next((r.error for r in reversed(self.runs) if r.error), "")

    def median(self, fn: Callable[[Measurement], float | None]) -> float | None:
        values = [v for v in map(fn, self.good) if v is not None]
        return statistics.median(values) if values else None

    @property
    def tokens_per_s(self) -> float | None:
        return self.median(lambda r: r.tokens_per_s(self.shape))


def summarise(results: list[Measurement], shape: Shape) -> dict[str, Summary]:
    names = dict.fromkeys(r.provider.name for r in results)
    return {n: Summary(PROVIDERS[n], [r for r in results if r.provider.name == n], shape) for n in names}


def ratio(a: float | None, b: float | None, unit: str = "") -> str:
    return f"{a / b:.3f}{unit}" if a and b else "n/a" if unit else "-"


def print_report(results: list[Measurement], shape: Shape, args: argparse.Namespace, peak: float | None) -> None:
    summary = summarise(results, shape)
    eager = summary.get("plain-eager")
    compiled = summary.get("plain-compiled")
    base_e = eager.tokens_per_s if eager else None
    base_c = compiled.tokens_per_s if compiled else None
    headers = [
        "provider", "attn/loss", "compile", "ms/step", "p50 step", "tokens/s", "best", "spread", "vs eager",
        "vs compiled", "MFU", "peak mem", "first step", "loss", "graphs/breaks",
    ]  # fmt: skip
    rows = []
    for name, s in summary.items():
        p = s.provider
        compile_cell = args.compile_backend if p.compiled else "no"
        if not s.good:
            rows.append([name, p.backends, compile_cell, "FAILED", *["-"] * 11])
            continue
        speed = s.tokens_per_s
        speeds = [r.tokens_per_s(shape) for r in s.good]
        spread = f"{(max(speeds) - min(speeds)) / speed:.1%}" if len(speeds) > 1 else "-"
        best = f"{max(speeds):,.0f}" if len(speeds) > 1 else "-"
        mem = s.median(lambda r: r.peak_memory)
        first = s.median(lambda r: r.time_to_first_step)
        graphs = ""
        if p.compiled:
            last = s.good[-1]
            graphs = f"{last.graphs}/{last.graph_breaks}" + (
                "" if last.compiled_with in ("", args.compile_backend) else f" ({last.compiled_with})"
            )
        rows.append([
            name,
            p.backends,
            compile_cell,
            harness.fmt(s.median(lambda r: r.ms_per_step), ".2f"),
            harness.fmt(s.median(lambda r: r.median_ms_per_step), ".2f"),
            f"{speed:,.0f}",
            best,
            spread,
            ratio(speed, base_e),
            ratio(speed, base_c),
            f"{speed * flops_per_token(shape, s.good[0].params) / peak:.1%}" if peak else "n/a",
            f"{mem / 2**20:,.0f} MiB" if mem is not None else "n/a",
            harness.fmt(first, ".2f") + " s" if first is not None else "-",
            harness.fmt(s.median(lambda r: r.final_loss), ".4f"),
            graphs or "-",
        ])  # fmt: skip
    print()
    harness.print_table(headers, rows)
    params = next((r.params for r in results if r.params), 0)
    print(
        f"({params:,} parameters; median of {args.repeats} run(s) per provider, {args.warmup} warmup + {args.steps} "
        "timed steps each; ms/step and tokens/s over the timed window, p50 step = median single step; best = the "
        "fastest run's tokens/s, spread = (max - min) / median tokens/s over the repeats; vs eager / vs compiled = tokens/s over plain-eager's / "
        "plain-compiled's; first step = from the provider's start to the end of its first optimizer step, "
        "compilation included; loss = the last step's)"
    )
    if peak:
        print(
            f"MFU = tokens/s * (6*N + 12*L*d*T) / peak = tokens/s * {flops_per_token(shape, params):.4g} FLOP/token / "
            f"{peak / 1e12:.0f}e12 FLOP/s"
        )
    else:
        print(
            "MFU: n/a (no known bf16 peak for this device); peak mem: n/a on CPU (see process_max_rss_mib in the CSV)"
        )
    if any(s.provider.kernels for s in summary.values()) and args.device_type == "cpu":
        print("kernels on CPU: attention/loss 'auto' run SDPA and lmforge's chunked torch cross-entropy (no Triton)")
    counts = {name: s.good[0].params for name, s in summary.items() if s.good}
    if len(set(counts.values())) > 1:
        print(
            "WARNING: the providers trained models of different sizes: "
            + ", ".join(f"{n} {c:,}" for n, c in counts.items())
        )
    for name, s in summary.items():
        note = next((r.note for r in s.runs if r.note), "")
        if note:
            print(f"{name}: note: {note}")
    for name, s in summary.items():
        if s.error:
            print(f"{name}: FAILED in {sum(1 for r in s.runs if r.error)} of {len(s.runs)} run(s): {s.error}")
    for name, s in summary.items():
        if s.provider.loop == "lmforge" and s.tokens_per_s:
            print(
                f"{name}: {ratio(s.tokens_per_s, base_e, 'x')} plain-eager, {ratio(s.tokens_per_s, base_c, 'x')} "
                "plain-compiled"
            )
    lm = summary.get("lmforge-torch-eager")
    if args.device_type == "cpu" and lm and lm.tokens_per_s and base_e:
        r = lm.tokens_per_s / base_e
        verdict = "meets" if r >= 0.95 else "MISSES"
        p50 = eager.median(lambda m: m.median_ms_per_step) / lm.median(lambda m: m.median_ms_per_step)
        best = max(m.tokens_per_s(shape) for m in lm.good) / max(m.tokens_per_s(shape) for m in eager.good)
        print(
            f"CPU bar (lmforge-torch-eager within 5% of plain-eager): {r:.3f} {verdict} it "
            f"(by median single step: {p50:.3f}; fastest run against fastest run: {best:.3f})"
        )


def plot(path: Path, results: list[Measurement], shape: Shape, title: str) -> bool:
    """A bar chart of median tokens/s per provider that ran; False when matplotlib is not installed."""
    speeds = {n: s.tokens_per_s for n, s in summarise(results, shape).items() if s.tokens_per_s}
    labels = {n.replace("-", "\n", 1): v for n, v in speeds.items()}
    colors = ["tab:gray" if n.startswith("plain") else "tab:blue" for n in speeds]
    return harness.plot_bars(
        path,
        labels,
        ylabel="tokens/s (higher is better)",
        title=title,
        colors=colors,
        figsize=(max(5.0, 1.4 * len(labels)), 4.0),
    )


# -- command line -----------------------------------------------------------------------------------
def parse_providers(text: str) -> list[str]:
    """A comma-separated list of provider names and groups (all, plain, lmforge, eager, compiled)."""
    names: list[str] = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if item not in PROVIDERS and item not in GROUPS:
            raise argparse.ArgumentTypeError(
                f"unknown {item!r}; choose from {', '.join(PROVIDERS)} or the groups {', '.join(GROUPS)}"
            )
        names += GROUPS.get(item, [item])
    if not names:
        raise argparse.ArgumentTypeError("no provider given")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="shape to start from (default: gpt2-124m on CUDA, anchor on CPU; quick under --quick)",
    )
    for key in PRESETS["anchor"]:
        p.add_argument(f"--{key}", type=int, help=f"override the preset's {key}")
    p.add_argument(
        "--providers",
        type=parse_providers,
        default=list(PROVIDERS),
        help=f"comma-separated providers or groups (default all): {', '.join(PROVIDERS)}; {', '.join(GROUPS)}",
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the compiled providers (default inductor; aot_eager compiles fast on CPU)",
    )
    p.add_argument(
        "--compile-caches",
        action="store_true",
        help="let providers use inductor's and Triton's on-disk caches (default: each provider that compiles gets "
        "empty ones, so that its time to first step is that of a first run)",
    )
    p.add_argument("--steps", type=int, help="timed steps per provider (default 20)")
    p.add_argument("--warmup", type=int, help="untimed steps before them (default 5; compilation happens here)")
    p.add_argument("--quick", action="store_true", help="a tiny shape, 2 warmup + 3 timed steps: a smoke test")
    p.add_argument("--repeats", type=int, default=1, help="runs per provider, interleaved; the median is shown")
    harness.add_device_arg(p)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--own-init",
        action="store_true",
        help="lmforge providers keep the weights lmforge initialises (default: they start from the plain loop's)",
    )
    harness.add_out_arg(p)
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.steps = args.steps if args.steps is not None else (3 if args.quick else 20)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--warmup, --steps and --repeats must be at least 1")
    return args


def build_shape(args: argparse.Namespace, device: torch.device) -> Shape:
    preset = args.preset or ("quick" if args.quick else "gpt2-124m" if device.type == "cuda" else "anchor")
    values = dict(PRESETS[preset])
    overrides = {k: getattr(args, k) for k in values if getattr(args, k) is not None and getattr(args, k) != values[k]}
    values.update(overrides)
    return Shape(name=preset + ("-custom" if overrides else ""), **values)


def main(argv: list[str] | None = None) -> int:
    """0, or 130 when cut short by SIGINT/SIGTERM (the providers measured so far are in the CSV and the table)."""
    code = harness.until_interrupted(lambda: run_all(parse_args(argv)))  # cut short before the first provider's row
    if code == 130 and __name__ == "__main__":
        # Cut short, often inside a compile: what was measured is written and printed; leave at once rather
        # than wait at exit for inductor's compile workers (a SIGKILL would follow a few seconds later).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run_all(args: argparse.Namespace) -> int:
    device = harness.pick_device(args.device)
    args.device_type = device.type
    shape = build_shape(args, device)
    providers = [PROVIDERS[n] for n in args.providers]
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    quiet_lightning()
    name = harness.device_name(device)
    env = harness.stamp(device)
    peak = peak_flops(name) if device.type == "cuda" else None
    found = harness.format_versions({k: env[k] for k in harness.VERSION_KEYS})
    print(f"device: {device.type} ({name}), threads {torch.get_num_threads()}; {found}")
    print(
        f"shape: {shape_label(shape)}, {precision(device)}; {args.warmup} warmup + {args.steps} timed steps, "
        f"{args.repeats} repeat(s); compile backend {args.compile_backend}"
    )
    print(
        f"load average before the runs: {harness.load_average()} (other work on the CPU slows and scatters the numbers)"
    )
    batches = Batches.random(shape, args.warmup + args.steps, args.seed)
    lmforge_runs = any(p.loop == "lmforge" for p in providers)
    args.reference_weights = reference_weights(shape, args.seed) if lmforge_runs and not args.own_init else None
    if any(p.compiled for p in providers):
        began = time.perf_counter()
        error = warm_compiler(args.compile_backend)
        state = f"failed: {error}" if error else f"{time.perf_counter() - began:.1f} s"
        caches = "kept" if args.compile_caches else "empty for each provider"
        print(f"compiler warm-up (a toy function, {args.compile_backend}): {state}; on-disk compile caches {caches}")
    writer = harness.RowWriter(args.out / "train.csv", common=env, fields=CSV_FIELDS)
    results: list[Measurement] = []
    for repeat in range(args.repeats):  # interleaved, so that drifting machine load hits every provider alike
        if results and results[-1].interrupted:
            break
        for provider in providers:
            r = run_provider(provider, repeat, shape, batches, args, device)
            results.append(r)
            writer.write(csv_row(r, shape, args, device, peak))
            if r.ok:
                first = f"{r.time_to_first_step:.2f} s" if r.time_to_first_step is not None else "-"
                print(
                    f"  {provider.name:<25} repeat {repeat}: {r.tokens_per_s(shape):>12,.0f} tokens/s, "
                    f"{r.ms_per_step:8.2f} ms/step (median step {r.median_ms_per_step:.2f} ms), first step {first}, "
                    f"load average {r.load_average}",
                    flush=True,
                )
            else:
                print(f"  {provider.name:<25} repeat {repeat}: FAILED: {r.error}", flush=True)
            if r.interrupted:
                break
    print_report(results, shape, args, peak)
    if results[-1].interrupted:
        print(f"interrupted: {sum(r.ok for r in results)} provider run(s) measured, kept in {writer.path}; no plot")
        return 130
    png = args.out / f"train_{harness.slug(shape.name)}_{device.type}.png"
    threads = next((r.threads for r in results if r.threads), torch.get_num_threads())
    title = (
        f"{shape_label(shape)}, {precision(device)}\n{name}, {threads} threads, compile backend {args.compile_backend}"
    )
    if not any(r.ok for r in results):
        print(f"wrote {writer.path}; no provider ran, so no plot")
    elif plot(png, results, shape, title):
        print(f"wrote {writer.path} and {png}")
    else:
        print(f"wrote {writer.path}; matplotlib is not installed, so no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
