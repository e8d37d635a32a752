"""Training throughput of lmforge's GPT: a plain PyTorch loop against lmforge's Lightning loop.

The question: does lmforge's training loop (``lightning.Trainer`` driving ``PretrainModule``) cost
anything compared with the same model trained by a bare PyTorch loop?

Providers, run side by side in one process on the same random tokens and the same seed:

* ``plain``: ``lmforge.model.GPT`` and the AdamW of ``lmforge.optim.adamw`` (the ``adamw`` optimizer plugin); each step is
  ``model.loss(x, y)``, ``backward``, ``clip_grad_norm_(1.0)``, ``step``, ``zero_grad`` (bf16 autocast on CUDA).
* ``lightning``: ``lmforge.pretrain.PretrainModule`` fitted by ``lightning.Trainer`` (no logger, checkpoints,
  progress bar or summary; gradient clipping 1.0; ``32-true`` on CPU, ``bf16-mixed`` on CUDA) over a DataLoader
  of an in-memory ``TensorDataset`` of (x, y) pairs. This includes everything lmforge's loop does per step:
  the DataLoader, the module's ``self.log`` calls, the warmup + cosine LR scheduler, the Trainer's hooks.

Only the steady state is timed: ``--warmup`` steps run first, then ``--steps`` steps are timed with
``time.perf_counter`` (around the loop for ``plain``; from a Callback's ``on_train_batch_end`` for ``lightning``,
which leaves Trainer start-up out). On CUDA the device is synchronised at both ends of the timed window.
Tokens/s is ``steps * batch * seq / seconds``. On H100/H200 an MFU estimate is added:
``(6 * N_params + 12 * n_layer * n_embd * seq)`` FLOPs per token against a bf16 dense peak of 989 TFLOP/s.

Results: a table on stdout, one CSV row per measurement appended to ``<out>/train.csv``, and a bar plot
``<out>/train_<shape>_<device>.png`` (skipped with a note when matplotlib is missing).

    python benchmarks/train.py --quick
    python benchmarks/train.py --steps 30
    python benchmarks/train.py --preset gpt-small --steps 20
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import harness
import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lmforge.model import GPT, GPTConfig
from lmforge.optim import adamw
from lmforge.pretrain import PretrainModule

PROVIDERS = ("plain", "lightning")
PRESETS = {
    "anchor": {"layers": 4, "width": 256, "heads": 4, "batch": 8, "seq": 256, "vocab": 320},
    "gpt-small": {"layers": 6, "width": 384, "heads": 6, "batch": 16, "seq": 256, "vocab": 320},
    "gpt-tiny": {"layers": 2, "width": 128, "heads": 4, "batch": 16, "seq": 128, "vocab": 320},
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
CSV_FIELDS = [
    "date",
    "provider",
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
    "torch",
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

    def config(self) -> GPTConfig:
        return GPTConfig(
            vocab_size=self.vocab, block_size=self.seq, n_layer=self.layers, n_head=self.heads, n_embd=self.width
        )

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq


@dataclass
class Measurement:
    """One timed window of one provider: perf_counter at its start and after each of its steps."""

    provider: str
    params: int
    marks: list[float]
    threads: int
    load_average: str
    repeat: int = 0

    @property
    def steps(self) -> int:
        return len(self.marks) - 1

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
        """Median of single steps: less moved than the mean by other work on a shared CPU (host time on CUDA)."""
        return 1000 * statistics.median(b - a for a, b in pairwise(self.marks))


# -- environment ------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def peak_flops(name: str) -> float | None:
    """The bf16 dense peak of a known GPU, else None."""
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def flops_per_token(shape: Shape, params: int) -> float:
    return 6 * params + 12 * shape.layers * shape.width * shape.seq


def load_average() -> str:
    """The 1-minute load average: how busy the machine was, this benchmark included."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def quiet_lightning() -> None:
    """Keep Lightning's start-up banners and expected warnings out of the report."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning 2.6 on torch 2.13


# -- providers --------------------------------------------------------------------------------------
def random_tokens(shape: Shape, num_steps: int, seed: int) -> Tensor:
    """Token batches (num_steps, B, T + 1), the same for every provider."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, shape.vocab, (num_steps, shape.batch, shape.seq + 1), generator=generator)


def run_plain(shape: Shape, tokens: Tensor, warmup: int, steps: int, device: torch.device, seed: int) -> Measurement:
    torch.manual_seed(seed)
    model = GPT(shape.config()).to(device)
    model.train()
    optimizer = adamw(model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(batch: Tensor) -> None:
        batch = batch.to(device, non_blocking=True)
        with autocast:
            loss = model.loss(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(tokens[i])
    harness.sync(device)
    marks = [time.perf_counter()]
    for i in range(warmup, warmup + steps):
        step(tokens[i])
        if i == warmup + steps - 1:
            harness.sync(device)
        marks.append(time.perf_counter())
    return Measurement("plain", model.num_parameters(), marks, torch.get_num_threads(), load_average())


class StepTimer(L.Callback):
    """Records perf_counter after optimizer steps ``warmup`` to ``warmup + steps``; syncs CUDA at both ends."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.first, self.last = warmup, warmup + steps
        self.device = device
        self.marks: list[float] = []
        self.threads = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if step in (self.first, self.last):
            harness.sync(self.device)
        if self.first <= step <= self.last:
            self.marks.append(time.perf_counter())
            self.threads = torch.get_num_threads()


def run_lightning(
    shape: Shape, tokens: Tensor, warmup: int, steps: int, device: torch.device, seed: int
) -> Measurement:
    torch.manual_seed(seed)
    module = PretrainModule(config=shape.config())
    flat = tokens.flatten(0, 1)  # (num_steps * B, T + 1), served in order
    loader = DataLoader(TensorDataset(flat[:, :-1], flat[:, 1:]), batch_size=shape.batch, shuffle=False)
    timer = StepTimer(warmup, steps, device)
    trainer = L.Trainer(
        max_steps=warmup + steps,
        accelerator=device.type,
        devices=1,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    return Measurement("lightning", module.model.num_parameters(), timer.marks, timer.threads, load_average())


RUNNERS: dict[str, Callable[..., Measurement]] = {"plain": run_plain, "lightning": run_lightning}


def measure(shape: Shape, providers: list[str], args: argparse.Namespace, device: torch.device) -> list[Measurement]:
    """Every provider ``--repeats`` times, interleaved so that drifting machine load hits all alike."""
    tokens = random_tokens(shape, args.warmup + args.steps, args.seed)
    results = []
    for repeat in range(args.repeats):
        for provider in providers:
            result = RUNNERS[provider](shape, tokens, args.warmup, args.steps, device, args.seed)
            result.repeat = repeat
            results.append(result)
            print(
                f"  {provider:<10} repeat {repeat}: {result.ms_per_step:8.1f} ms/step (median step "
                f"{result.median_ms_per_step:.1f} ms), load average {result.load_average}",
                flush=True,
            )
    return results


# -- report -----------------------------------------------------------------------------------------
def summarise(results: list[Measurement], shape: Shape) -> dict[str, tuple[float, float]]:
    """Per provider, over its repeats: the median tokens/s and the median of its median step times."""
    providers = dict.fromkeys(r.provider for r in results)
    return {
        p: (
            statistics.median(r.tokens_per_s(shape) for r in results if r.provider == p),
            statistics.median(r.median_ms_per_step for r in results if r.provider == p),
        )
        for p in providers
    }


def shape_label(shape: Shape) -> str:
    return f"{shape.name} (L{shape.layers} d{shape.width} h{shape.heads} B{shape.batch}xT{shape.seq} V{shape.vocab})"


def print_table(results: list[Measurement], shape: Shape, repeats: int, peak: float | None) -> None:
    summary = summarise(results, shape)
    base = summary["plain"][0] if "plain" in summary else None
    params = results[0].params
    headers = ["provider", "shape", "params", "ms/step", "p50 step", "tokens/s", "vs plain"] + (["MFU"] if peak else [])
    rows = []
    for provider, (speed, median_ms) in summary.items():
        ms = 1000 * shape.tokens_per_step / speed
        row = [provider, shape_label(shape), f"{params:,}", f"{ms:.1f}", f"{median_ms:.1f}", f"{speed:,.0f}"]
        row.append(f"{speed / base:.3f}" if base else "-")
        if peak:
            row.append(f"{speed * flops_per_token(shape, params) / peak:.1%}")
        rows.append(row)
    harness.print_table(headers, rows)
    print(
        f"(median of {repeats} run(s) per provider; ms/step and tokens/s over the timed window, p50 step = median "
        "single step; vs plain = tokens/s / tokens/s of plain)"
    )
    if peak:
        print(
            f"MFU = tokens/s * (6*N + 12*L*d*T) / peak = tokens/s * (6*{params:,} + 12*{shape.layers}*{shape.width}"
            f"*{shape.seq}) / {peak / 1e12:.0f}e12 FLOP/s"
        )


def csv_rows(results: list[Measurement], shape: Shape, args: argparse.Namespace, device: torch.device) -> list[dict]:
    name = harness.device_name(device)
    peak = peak_flops(name) if device.type == "cuda" else None
    common = {
        "shape": shape.name,
        "layers": shape.layers,
        "width": shape.width,
        "heads": shape.heads,
        "batch": shape.batch,
        "seq": shape.seq,
        "vocab": shape.vocab,
        "device": device.type,
        "precision": "bf16-mixed" if device.type == "cuda" else "32-true",
        "warmup": args.warmup,
    }
    return [
        {
            **common,
            "provider": r.provider,
            "repeat": r.repeat,
            "params": r.params,
            "threads": r.threads,
            "load_average": r.load_average,
            "steps": r.steps,
            "seconds": f"{r.seconds:.4f}",
            "ms_per_step": f"{r.ms_per_step:.2f}",
            "median_ms_per_step": f"{r.median_ms_per_step:.2f}",
            "tokens_per_s": f"{r.tokens_per_s(shape):.1f}",
            "mfu": f"{r.tokens_per_s(shape) * flops_per_token(shape, r.params) / peak:.4f}" if peak else "",
        }
        for r in results
    ]


def plot(path: Path, results: list[Measurement], shape: Shape, title: str) -> bool:
    """A bar chart of tokens/s per provider; False when matplotlib is not installed."""
    speeds = {provider: speed for provider, (speed, _) in summarise(results, shape).items()}
    return harness.plot_bars(
        path, speeds, ylabel="tokens/s (higher is better)", title=title, colors=["tab:gray", "tab:blue"]
    )


# -- command line -----------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="anchor", help="shape to start from (default anchor)")
    for key in PRESETS["anchor"]:
        p.add_argument(f"--{key}", type=int, help=f"override the preset's {key}")
    p.add_argument("--steps", type=int, default=20, help="timed steps per provider (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before them (default 5)")
    p.add_argument("--quick", action="store_true", help="2 warmup + 5 timed steps: a smoke test, not a number")
    p.add_argument("--repeats", type=int, default=1, help="runs per provider, interleaved; the median is shown")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--providers", default="plain,lightning", help="comma-separated subset of plain,lightning")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for both providers (default: torch's choice)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args()
    if args.quick:
        args.warmup, args.steps = 2, 5
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--warmup, --steps and --repeats must be at least 1")
    return args


def build_shape(args: argparse.Namespace) -> Shape:
    values = dict(PRESETS[args.preset])
    overrides = {k: getattr(args, k) for k in values if getattr(args, k) is not None and getattr(args, k) != values[k]}
    values.update(overrides)
    name = args.preset + ("-custom" if overrides else "")
    return Shape(name=name, **values)


def parse_providers(text: str) -> list[str]:
    providers = [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown or not providers:
        raise SystemExit(f"--providers: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(PROVIDERS)}")
    return providers


def main() -> None:
    args = parse_args()
    shape = build_shape(args)
    providers = parse_providers(args.providers)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    quiet_lightning()
    name = harness.device_name(device)
    env = harness.stamp(device)
    print(
        f"device: {device.type} ({name}), threads {torch.get_num_threads()}, torch {env['torch']}, "
        f"lightning {env['lightning']}, lmforge {env['lmforge']}"
    )
    print(f"shape: {shape_label(shape)}; {args.warmup} warmup + {args.steps} timed steps, {args.repeats} repeat(s)")
    print(f"load average before the runs: {load_average()} (other work on the CPU slows and scatters the numbers)")
    results = measure(shape, providers, args, device)
    peak = peak_flops(name) if device.type == "cuda" else None
    print()
    print_table(results, shape, args.repeats, peak)
    args.out.mkdir(parents=True, exist_ok=True)
    env["date"] = harness.iso_date()  # when the results were written, as before
    csv_path = harness.write_csv(
        args.out / "train.csv", csv_rows(results, shape, args, device), common=env, fields=CSV_FIELDS
    )
    png = args.out / f"train_{shape.name}_{device.type}.png"
    title = f"{shape_label(shape)}\n{name}, {results[0].threads} threads"
    if plot(png, results, shape, title):
        print(f"wrote {csv_path} and {png}")
    else:
        print(f"wrote {csv_path}; matplotlib is not installed, so no plot")


if __name__ == "__main__":
    main()
