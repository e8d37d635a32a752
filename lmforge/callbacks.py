"""Callbacks that make the cost of training visible: tokens per second, time to the first step."""

from __future__ import annotations

import time

import lightning as L
import torch

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
    return {
        "hardware": hardware_name(),
        "devices": trainer.num_devices * trainer.num_nodes,
        "precision": str(trainer.precision),
        "tokens_seen": tokens,
    }
