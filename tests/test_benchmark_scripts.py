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
