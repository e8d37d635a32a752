"""lmforge's Triton kernels compile for a real GPU, checked on a machine without one.

The interpreter (the rest of this folder) checks what the kernels compute; it never runs Triton's
compiler. Here ``benchmarks/kernel_report.py`` compiles the first tuned configuration of every kernel
ahead of time for sm_90 (H100/H200) with Triton's own compiler and ptxas, as a training launch would
build it, and reads the result back. Every variant (causal or not, with key padding or segment ids)
must compile: the interpreter accepts code that Triton's compiler rejects (a loop-carried ``_`` that
changes shape was one). Without masks each must also fit in shared memory and keep every value in
registers (no spills to local memory); the masked variants carry more state, and small spills there
are reported by the script, not failed here. A kernel change that breaks the GPU build, or makes the
main configuration spill, fails here instead of on the first GPU that runs it.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(sys.platform != "linux", reason="triton ships ptxas for Linux")
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default of the triton versions lmforge runs on, said explicitly
    command = [sys.executable, str(ROOT / "benchmarks" / "kernel_report.py"), "--quick", "--masks", "--arch", "90"]
    command += ["--head-dims", "64,128", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, f"kernel_report failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    rows = list(csv.DictReader(open(tmp_path / "kernel_report.csv")))
    kernels = {r["kernel"] for r in rows}
    assert kernels == {
        "attn-fwd",
        "attn-bwd",
        "attn-dkdv",
        "attn-dq",
        "attn-delta",
        "attn-dq-cast",
        "ce-rows",
        "scale",
    }, kernels
    broken = [f"{r['kernel']} {r['variant']} {r['config']}: {r['verdict']}" for r in rows if "error" in r["verdict"]]
    assert not broken, "kernels that do not compile for sm_90:\n" + "\n".join(broken)
    plain = [r for r in rows if "+" not in r["variant"]]
    bad = [f"{r['kernel']} {r['variant']} {r['config']}: {r['verdict']}" for r in plain if r["verdict"] != "ok"]
    assert not bad, "kernels that do not compile cleanly for sm_90:\n" + "\n".join(bad)
    attention = [r for r in rows if r["kernel"] in ("attn-fwd", "attn-bwd", "attn-dkdv", "attn-dq")]
    assert all(int(r["hgmma"]) > 0 for r in attention), "attention products not on Hopper's wgmma (HGMMA)"
