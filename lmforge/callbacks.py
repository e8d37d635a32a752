"""Callbacks: checkpoints that are never half-written and always cover the end of a run or an interrupt
(:class:`Checkpointing`), and the cost of training made visible (:class:`TokenThroughput`; :class:`EnergyMeter`:
time, energy, CO2 and peak memory as measured)."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from lmforge.atomic import staged_file
from lmforge.checkpoint import refuse_damaged, torch_load
from lmforge.errors import CheckpointError, TrainingInterrupted

log = logging.getLogger("lmforge")

# Set by the CLI when the process starts, so "time to first step" includes imports and data preparation.
PROCESS_START: float | None = None


class TokenThroughput(L.Callback):
    """Logs training tokens/s (``train/tokens_per_sec``), prints the time to the first step and a summary."""

    def __init__(self, window: int = 20) -> None:
        """
        Args:
            window: Steps over which tokens/s is averaged.
        """
        self.window = window
        self._times: list[tuple[float, int]] = []
        self._tokens = 0
        self.total_tokens = 0
        """Training tokens over the whole run, resumes included (saved in checkpoints)."""
        self._fit_start = 0.0
        self._first_step: float | None = None

    def state_dict(self) -> dict:
        return {"total_tokens": self.total_tokens}

    def load_state_dict(self, state_dict: dict) -> None:
        self.total_tokens = int(state_dict.get("total_tokens", 0))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._times.clear()
        self._tokens = 0
        self._first_step = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        self._tokens += int(ids.numel()) * trainer.world_size
        self.total_tokens += int(ids.numel()) * trainer.world_size
        if self._first_step is None:
            self._first_step = now
            since = now - PROCESS_START if PROCESS_START is not None else now - self._fit_start
            pl_module.print(f"lmforge: first training step done {since:.1f} s after the command started")
        self._times.append((now, self._tokens))
        self._times = self._times[-(self.window + 1) :]
        if len(self._times) > 1:
            (t0, n0), (t1, n1) = self._times[0], self._times[-1]
            pl_module.log("train/tokens_per_sec", (n1 - n0) / max(t1 - t0, 1e-9), prog_bar=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._first_step is None:
            return
        elapsed = time.perf_counter() - self._first_step
        steady = self._tokens - (self._times[0][1] if self._times else 0)
        parts = [f"{trainer.global_step} steps", f"{self._tokens:,} tokens"]
        if elapsed > 0:
            parts.append(f"{self._tokens / elapsed:,.0f} tokens/s after the first step")
        if len(self._times) > 1:
            span = self._times[-1][0] - self._times[0][0]
            parts.append(f"{steady / max(span, 1e-9):,.0f} tokens/s over the last {len(self._times) - 1} steps")
        if torch.cuda.is_available():
            parts.append(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        val = trainer.callback_metrics.get("val/loss")
        if val is not None:
            parts.append(f"val/loss {float(val):.4f}")
            gap = trainer.callback_metrics.get("val/gap_to_entropy")
            if gap is not None:
                parts.append(f"corpus entropy {float(val) - float(gap):.4f} nats/token")
        if trainer.is_global_zero:  # plain print: the progress bar is closed by now and would swallow it
            print("lmforge: " + ", ".join(parts), flush=True)


def hardware_name() -> str:
    """The accelerator (or CPU) this process trains on, in words."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"CPU ({cpu}, {torch.get_num_threads()} threads)"


def run_facts(trainer: L.Trainer | None) -> dict:
    """What a checkpoint records about the run that wrote it (for model cards): hardware, tokens, precision."""
    if trainer is None:
        return {}
    tokens = next((cb.total_tokens for cb in trainer.callbacks if isinstance(cb, TokenThroughput)), None)
    meter = next((cb for cb in trainer.callbacks if isinstance(cb, EnergyMeter)), None)
    facts = {
        "hardware": hardware_name(),
        "devices": trainer.num_devices * trainer.num_nodes,
        "precision": str(trainer.precision),
        "tokens_seen": tokens,
    }
    if meter is not None and (meter.result is not None or meter._t0 is not None):
        facts["measured"] = meter.snapshot(trainer)
    return facts


# -- checkpoints ---------------------------------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves each checkpoint to a temporary file beside its final path, flushed and renamed over it (a rename in
    one folder is atomic; Lightning's own writes through $TMPDIR and moves, a copy across filesystems, and a
    full disk left a half-written file under the final name). Loads with ``weights_only=True`` only, a
    damaged or hostile file being one line that offers the newest readable checkpoint beside it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with staged_file(path) as tmp, open(tmp, "wb") as f:
            try:
                torch.save(checkpoint, f)
            except RuntimeError as err:  # torch's writer reports a failed write (a full disk) as its own error
                if isinstance(err.__context__, OSError):
                    raise err.__context__ from None
                raise

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        try:
            return torch_load(path)
        except CheckpointError as err:
            raise refuse_damaged(path, err) from None


class Checkpointing(ModelCheckpoint):
    """A ModelCheckpoint that lmforge's runs use (the config's ``checkpoint`` section takes its arguments):

    - checkpoints are written atomically and read weights-only (:class:`AtomicCheckpointIO`);
    - the end of a run is always saved, also when ``max_steps`` is not a multiple of ``every_n_train_steps``;
    - SIGINT (Ctrl-C) or SIGTERM (what SLURM and other schedulers send before they kill) stops the run at the
      next optimizer step, on every rank at the same step: the checkpoint is saved as ``last.ckpt``, and
      :class:`~lmforge.errors.TrainingInterrupted` ends the process with 130 or 143, never 0. A second
      Ctrl-C aborts at once, without saving.
    """

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._signal: int | None = None
        self._handlers: dict[int, Any] = {}
        self._step_at_batch_start = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    # -- interrupts --------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self._signal is None:
            if self._trainer.is_global_zero:
                name = signal.Signals(signum).name
                log.warning("%s received: saving a checkpoint after the current optimizer step", name)
            launcher = self._trainer.strategy.launcher
            if launcher is not None:  # ranks started as subprocesses of this one hear it too
                launcher.kill(signum)
        self._signal = signum

    def _install_handlers(self) -> None:
        for signum in self._SIGNALS:
            try:
                previous = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: leave signals to whoever owns them
                return
            self._handlers.setdefault(signum, previous)

    def _restore_handlers(self) -> None:
        for signum, handler in self._handlers.items():
            try:
                signal.signal(signum, handler)
            except (ValueError, TypeError):
                pass
        self._handlers.clear()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        resumed = trainer.ckpt_path
        if resumed and self.dirpath and not self.last_model_path and self.CHECKPOINT_NAME_LAST in Path(resumed).name:
            if Path(resumed).resolve().parent == Path(self.dirpath).resolve():
                # resuming from this folder's last.ckpt: it is the one to replace (not keep beside a last-v1.ckpt),
                # also when the callback's own state did not restore (other every_n_* settings give another key)
                self.last_model_path = str(resumed)
        self._trainer = trainer
        self._signal = None
        self._install_handlers()  # after Lightning's own, which it registers before the loop starts

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == self._step_at_batch_start:
            return  # inside gradient accumulation: wait for the optimizer step
        stop = self._signal is not None
        if trainer.world_size > 1:
            # the ranks agree on stopping every few steps, not every step (each agreement waits for the GPU)
            if trainer.global_step % max(1, min(trainer.log_every_n_steps, 10)) and trainer.global_step < (
                trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else float("inf")
            ):
                return
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        signum = self._signal or signal.SIGTERM
        path = self._save_now(trainer)
        raise TrainingInterrupted(signum, trainer.global_step, path, trainer.is_global_zero)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run and trainer.global_step not in (0, self._last_global_step_saved):
            self._save_now(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()
        super().teardown(trainer, pl_module, stage)

    def _save_now(self, trainer: L.Trainer) -> str:
        """Save the current step as the last checkpoint (whatever every_n_* says); returns its path."""
        candidates = self._monitor_candidates(trainer)
        if self.save_last:
            if self.save_last == "link":
                if self.save_top_k != 0 and self.monitor is None:
                    self._save_none_monitor_checkpoint(trainer, candidates)  # the file the link points to
                else:
                    self._last_checkpoint_saved = ""  # nothing current to link to: write the file itself
            self._save_last_checkpoint(trainer, candidates)
            return self.last_model_path
        path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        self._save_checkpoint(trainer, path)
        return path


class EnergyMeter(L.Callback):
    """Measures the training itself: wall time, energy from the GPU's and CPU's own counters
    (:mod:`lmforge.energy`: NVML, RAPL; whatever is readable, nothing estimated), peak memory, and CO2 when a grid
    intensity is given. Summed over ranks and resumes, printed at the end, recorded in checkpoints (and from there
    in the model card's ``co2_eq_emissions`` and compute section)."""

    def __init__(self, backend: str = "auto", pue: float = 1.0, grid_g_per_kwh: float | None = None) -> None:
        """
        Args:
            backend: auto (NVML on NVIDIA GPUs, RAPL on CPUs where readable), nvml, rapl, or off.
            pue: The data centre's power usage effectiveness (1.0: the machine's own energy only).
            grid_g_per_kwh: Carbon intensity of the electricity (g CO2eq per kWh) for the CO2 figure; None: no
                CO2 figure (the energy is still recorded).
        """
        from lmforge.errors import UserError

        if backend not in ("auto", "nvml", "rapl", "off"):
            raise UserError(f"energy.backend={backend!r} is not one of auto, nvml, rapl, off")
        if not (isinstance(pue, (int, float)) and pue >= 1.0):
            raise UserError(f"energy.pue={pue!r} must be a number >= 1 (1.0: the machine's own energy)")
        if grid_g_per_kwh is not None and not (isinstance(grid_g_per_kwh, (int, float)) and grid_g_per_kwh >= 0):
            raise UserError(f"energy.grid_g_per_kwh={grid_g_per_kwh!r} must be a non-negative number of g CO2eq/kWh")
        self.backend, self.pue, self.grid = backend, float(pue), grid_g_per_kwh
        self._before = {"seconds": 0.0, "gpu_j": None, "cpu_j": None, "ranks": 1}  # earlier runs (resumes)
        self._counters = None
        self._t0: float | None = None
        self.result: dict | None = None
        """What the last finished fit measured (:func:`lmforge.energy.summarize`), summed over the ranks."""

    # -- state (resumes add up) -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return self._totals()

    def load_state_dict(self, state_dict: dict) -> None:
        self._before = {k: state_dict.get(k) for k in ("seconds", "gpu_j", "cpu_j", "ranks")}
        self._before["seconds"] = float(self._before["seconds"] or 0.0)

    def _totals(self, gpu_j: float | None = None, cpu_j: float | None = None, ranks: int = 1) -> dict:
        """Everything so far: earlier runs plus this one (this process' counters unless given)."""
        seconds = self._before["seconds"] + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)
        if self._counters is not None and gpu_j is None and cpu_j is None:
            gpu_j, cpu_j = self._counters.since_start()

        def add(old: float | None, new: float | None) -> float | None:
            return new if old is None else old if new is None else old + new

        sources = self._counters.sources if self._counters is not None else []
        return {"seconds": seconds, "gpu_j": add(self._before["gpu_j"], gpu_j),
                "cpu_j": add(self._before["cpu_j"], cpu_j), "ranks": ranks, "sources": sources}  # fmt: skip

    def snapshot(self, trainer: L.Trainer | None = None) -> dict:
        """What is measured so far, for a checkpoint: the final (all-rank) result once training ended, else this
        process' counters (``ranks``: how many processes' energy the figures hold)."""
        from lmforge import energy

        if self.result is not None:
            return self.result
        totals = self._totals()
        device = trainer.strategy.root_device if trainer is not None else None
        peak, what = energy.peak_memory_bytes(device)
        return energy.summarize(totals["seconds"], totals["gpu_j"], totals["cpu_j"], totals["sources"], self.pue,
                                self.grid, ranks=totals["ranks"], peak_memory_bytes=peak, peak_memory_what=what)  # fmt: skip

    # -- hooks ------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lmforge.energy import CounterSet

        device = trainer.strategy.root_device
        index = (device.index or 0) if device.type == "cuda" else None
        self._counters = None if self.backend == "off" else CounterSet(self.backend, index)
        if self._counters is not None:
            self._counters.start()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.result = None
        self._t0 = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lmforge import energy

        if self._t0 is None:
            return
        gpu_j, cpu_j = self._counters.since_start() if self._counters is not None else (None, None)
        device = trainer.strategy.root_device
        peak, what = energy.peak_memory_bytes(device)
        if trainer.world_size > 1:  # every rank's energy, the largest peak (a collective: every rank is here)
            values = torch.tensor([gpu_j if gpu_j is not None else float("nan"), cpu_j if cpu_j is not None else float("nan")],
                                  dtype=torch.float64, device=device)  # fmt: skip
            values = trainer.strategy.reduce(values, reduce_op="sum")
            peak = int(trainer.strategy.reduce(torch.tensor(float(peak), device=device), reduce_op="max"))
            gpu_j, cpu_j = (None if torch.isnan(v) else float(v) for v in values)
        sources = self._counters.sources if self._counters is not None else []
        self._counters = None  # the run is over: what follows (state_dict) reads the totals
        totals = {**self._totals(gpu_j, cpu_j, trainer.world_size), "sources": sources}
        self._t0 = None
        self.result = energy.summarize(totals["seconds"], totals["gpu_j"], totals["cpu_j"], totals["sources"],
                                       self.pue, self.grid, ranks=trainer.world_size, peak_memory_bytes=peak,
                                       peak_memory_what=what)  # fmt: skip
        self._before = {k: totals[k] for k in ("seconds", "gpu_j", "cpu_j", "ranks")}
        if trainer.is_global_zero:
            print("lmforge: measured: " + energy.describe(self.result), flush=True)
