"""The benchmark scripts run end to end (``benchmarks/*.py``), as a user runs them: in a subprocess.

Without CUDA (or with ``--device cpu``) a script makes no speed claim: it checks lmforge's kernel under the
Triton interpreter (the script sets ``TRITON_INTERPRET=1`` itself before importing the kernel) and times
the torch paths on CPU at small sizes. That mode is what runs here, on any machine, in well under a minute.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_attn_masked_quick_cpu(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/attn_masked.py", "--quick", "--device", "cpu", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, log
    assert "no speed is claimed" in proc.stdout, log

    # (a) the correctness smoke: one row per case (a packed and a padded one), each ending in "pass"
    smoke_rows = [line for line in proc.stdout.splitlines() if line.startswith(("packed ", "padding "))]
    smoke_rows = [line for line in smoke_rows if line.rstrip().endswith(("pass", "FAIL")) or "FAIL (" in line]
    assert [line.split()[0] for line in smoke_rows] == ["packed", "padding"], log
    assert all(line.rstrip().endswith("pass") for line in smoke_rows), log
    assert "smoke: all passed" in proc.stdout, log

    # (b) the CPU timings of the torch providers, in the CSV for both quick cases
    path = tmp_path / "attn_masked.csv"
    assert path.exists(), log
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["kind"], r["provider"]) for r in rows} >= {
        (kind, provider) for kind in ("packed", "padding") for provider in ("sdpa-causal-nomask", "sdpa-bool-mask")
    }, rows
    assert all(float(r["ms"]) > 0 and r["device_name"] and r["torch"] and r["date"] for r in rows), rows
    assert all(0 < float(r["attended_fraction"]) <= 1 for r in rows), rows


TRAIN_PROVIDERS = [
    "plain-eager",
    "plain-compiled",
    "lmforge-torch-eager",
    "lmforge-torch-compiled",
    "lmforge-kernels-eager",
    "lmforge-kernels-compiled",
]
TRAIN_COLUMNS = {
    "date", "provider", "status", "loop", "attention", "loss", "compile", "compile_backend", "shape", "params",
    "device", "device_name", "precision", "warmup", "steps", "ms_per_step", "median_ms_per_step", "tokens_per_s",
    "mfu", "peak_memory_mib", "process_max_rss_mib", "time_to_first_step_s", "final_loss", "error", "torch",
    "lightning", "lmforge",
}  # fmt: skip


def run_train(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, list[dict[str, str]], str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/train.py", "--quick", "--device", "cpu", "--out", str(tmp_path), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    log = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, log
    path = tmp_path / "train.csv"
    assert path.exists(), log
    with path.open(newline="") as f:
        return proc, list(csv.DictReader(f)), log


def test_train_quick_cpu_all_providers(tmp_path):
    """Every provider trains the quick shape (compiled ones with the fast aot_eager backend) and gets one CSV row."""
    proc, rows, log = run_train(tmp_path, "--compile-backend", "aot_eager")
    assert [r["provider"] for r in rows] == TRAIN_PROVIDERS, log
    assert TRAIN_COLUMNS <= set(rows[0]), rows[0].keys()
    for r in rows:
        assert r["status"] == "ok" and not r["error"], (r, log)
        assert float(r["tokens_per_s"]) > 0 and float(r["ms_per_step"]) > 0, r
        assert float(r["time_to_first_step_s"]) > 0 and int(r["steps"]) == 3, r
        assert r["mfu"] == "n/a" and r["peak_memory_mib"] == "n/a", r  # CPU: no peak FLOP/s, no CUDA memory
        assert r["device"] == "cpu" and r["precision"] == "32-true" and r["date"] and r["torch"], r
        assert (r["compile_backend"] == "aot_eager") == r["provider"].endswith("-compiled"), r
    # the same model, data and initial weights: after five steps the losses agree closely
    losses = [float(r["final_loss"]) for r in rows]
    assert max(losses) - min(losses) < 0.05, losses
    # the summary: ratios to both plain loops, and the CPU bar's verdict
    assert "lmforge-torch-eager:" in proc.stdout and "x plain-compiled" in proc.stdout, log
    assert "CPU bar (lmforge-torch-eager within 5% of plain-eager)" in proc.stdout, log


def test_train_failing_provider_is_a_row(tmp_path):
    """A provider that cannot run (here: an unknown compile backend) writes its error; the others still run."""
    providers = "plain-eager,plain-compiled,lmforge-torch-compiled"
    proc, rows, log = run_train(tmp_path, "--providers", providers, "--compile-backend", "no-such-backend")
    assert [r["provider"] for r in rows] == providers.split(","), log
    assert rows[0]["status"] == "ok" and float(rows[0]["tokens_per_s"]) > 0, rows[0]
    for r in rows[1:]:
        assert r["status"] == "error" and "no-such-backend" in r["error"] and not r["tokens_per_s"], r
    assert "FAILED" in proc.stdout, log


def test_data_quick(tmp_path):
    """benchmarks/data.py: lmforge's token cache and Hugging Face datasets write the same tokens (a smoke run)."""
    pytest.importorskip("datasets")
    proc = subprocess.run(
        [sys.executable, "benchmarks/data.py", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, env={**os.environ, "MPLBACKEND": "Agg"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, log
    with (tmp_path / "data.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["impl"], r["num_proc"]) for r in rows} == {(i, n) for i in ("lmforge", "hf-datasets") for n in "12"}
    assert all(r["identical_tokens"] == "True" and float(r["mb_per_s"]) > 0 for r in rows), rows


def test_memory_quick(tmp_path):
    """benchmarks/memory.py: a short fit's estimate-vs-measured table read back into memory.csv (CPU: not claimed)."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/memory.py", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, log
    with (tmp_path / "memory.csv").open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["config"] == "gpt-tiny" and float(row["estimated_gib"]) > 0 and float(row["measured_gib"]) > 0, row
    assert row["difference"] == "not comparable" and "resident set" in row["measured_as"], row
