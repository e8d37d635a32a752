"""The GPU session script returns its numbers: ``benchmarks/gpu_session.sh`` and the scripts it runs.

The session itself needs a lent GPU; its dry run (``DRY_RUN=1``: every step at tiny sizes on the CPU, the
gate under the Triton interpreter) checks the plumbing here: the exit code, the files that come back (at
most 8 plain files, no folder, no link), the summary's sections and the tarball's logs and CSVs. A
benchmark cut short by SIGINT (as ``timeout -s INT`` does at a step's limit) keeps the rows it wrote.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("env", "gate", "attn", "masked", "ce", "train", "finetune")
SECTIONS = (
    "== steps",
    "== environment",
    "== attention (attn.csv)",
    "== masked attention (attn_masked.csv)",
    "== fused linear + cross-entropy (ce.csv)",
    "== training step (train.csv)",
    "== tiles.json",
    "== fine-tune smoke",
)
LOGS = [f"{name}.log" for name in STEPS]
CSVS = ["attn.csv", "attn_masked.csv", "ce.csv", "train.csv", "gate/gate.csv"]

needs_tools = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils' timeout"
)


def run_session(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    out.mkdir()
    environ = {
        **os.environ,
        "DRY_RUN": "1",
        "OUT": str(out),
        "WORK": str(tmp_path / "work"),
        "PYTHON": sys.executable,
        "TRITON_CACHE_DIR": str(tmp_path / "triton-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache"),
        **env,
    }
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_session.sh"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=420,
    )
    return proc, out


def check_returned_files(out: Path, log: str) -> list[str]:
    """What the device tool would bring back: at most 8 plain files directly in OUT, no folder, no link."""
    entries = sorted(out.iterdir())
    assert len(entries) <= 8, (entries, log)
    for entry in entries:
        assert entry.is_file() and not entry.is_symlink(), (entry, log)
    names = [e.name for e in entries]
    assert "summary.txt" in names and "session.tar.gz" in names, (names, log)
    return names


def csv_rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode())))


@needs_tools
@pytest.mark.slow
def test_dry_run_returns_its_files(tmp_path):
    began = time.monotonic()
    proc, out = run_session(tmp_path)
    log = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, log
    assert time.monotonic() - began < 400, log
    names = check_returned_files(out, log)
    assert {"gate.csv", "attn.csv", "attn_masked.csv", "ce.csv", "train.csv"} <= set(names), (names, log)

    summary = (out / "summary.txt").read_text()
    lines = summary.splitlines()
    assert lines[0].startswith("DRY RUN"), summary
    assert lines[1].startswith("GATE: PASS"), summary  # the gate's verdict first
    assert "determinism: deterministic=True run twice, bitwise equal" in summary, summary
    assert "across shard processes [0, 1]: digests equal" in summary, summary
    for section in SECTIONS:
        assert section in summary, (section, summary)
    step_lines = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in STEPS}
    for name in STEPS:  # a step may be cut short on a busy machine (it keeps its rows), never fail or be skipped
        assert name in step_lines, (name, summary)
        assert step_lines[name].rstrip().endswith(("ok", "is kept")), (name, summary)
    assert step_lines["gate"].rstrip().endswith("ok"), summary
    assert "nvidia-smi: not found" in summary or "NVIDIA" in summary, summary

    with tarfile.open(out / "session.tar.gz") as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
        for name in LOGS + CSVS + ["steps.tsv", "summary.txt", "gate/gate_summary.txt"]:
            assert name in members and members[name].isfile(), (name, sorted(members))
        assert not any(m.issym() or m.islnk() for m in members.values()), sorted(members)
        assert not any(name.startswith("finetune/") for name in members), sorted(members)
        for name in CSVS:
            rows = csv_rows(tar.extractfile(members[name]).read())
            assert rows, name
        gate = csv_rows(tar.extractfile(members["gate/gate.csv"]).read())
        assert {r["kernel"] for r in gate if r["kind"] == "attention"} == {"fwd", "bwd", "dkdv", "dq"}, gate
        assert all(r["status"] == "pass" for r in gate), [r for r in gate if r["status"] != "pass"]
        assert "generated" in tar.extractfile(members["finetune.log"]).read().decode(), "no generation"
    assert csv_rows((out / "train.csv").read_bytes()), log  # the key CSVs come back beside the tarball


@needs_tools
@pytest.mark.slow
def test_dry_run_with_too_small_a_budget_still_returns(tmp_path):
    """A budget that fits only the first steps: the gate stops itself in time, the later steps are skipped
    and said so, and the files still come back."""
    # 35 s leave 25 s for the steps: less than they take even on a fast machine (about 30 s), so a late step
    # is always skipped, whatever the speed of the machine that runs the test
    proc, out = run_session(tmp_path, BUDGET="35")
    log = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, log
    check_returned_files(out, log)
    summary = (out / "summary.txt").read_text()
    assert summary.splitlines()[1].startswith("GATE: "), summary
    assert "GATE: NOT RUN" not in summary, summary
    assert "skipped (budget spent)" in summary, summary
    with tarfile.open(out / "session.tar.gz") as tar:
        names = {m.name.removeprefix("./") for m in tar.getmembers()}
    assert {"env.log", "gate.log", "steps.tsv", "gate/gate_summary.txt"} <= names, sorted(names)


def wait_for_rows(path: Path, proc: subprocess.Popen, rows: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) > rows:  # the header and `rows` rows
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} did not get {rows} row(s) within {timeout} s (exit code {proc.poll()})")


@needs_tools
@pytest.mark.parametrize(
    "script, csv_name, extra",
    [
        ("attn.py", "attn.csv", ["--quick", "--no-smoke", "--rep", "400"]),
        ("ce.py", "ce.csv", ["--no-smoke", "--tokens", "256", "--hidden", "64", "--vocab", "2000", "--rep", "400"]),
    ],
)
def test_benchmark_cut_short_keeps_its_rows(tmp_path, script, csv_name, extra):
    """SIGINT after the first row, as `timeout -s INT` sends at a step's limit: the rows measured stay in the
    CSV, the table of what was measured is printed, the exit is clean (code 130, no traceback)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, f"benchmarks/{script}", "--device", "cpu", "--out", str(tmp_path), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_rows(tmp_path / csv_name, proc, 1, timeout=120)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert proc.returncode == 130, log
    assert "interrupted:" in stdout and "Traceback" not in stderr, log
    with (tmp_path / csv_name).open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(float(r["ms"]) > 0 for r in rows if r.get("ms")), rows
    assert "provider" in stdout.split("interrupted:", 1)[1], log  # the table of what was measured


def test_gate_plan_without_the_tile_api(tmp_path, monkeypatch):
    """An attention module without tile_lists/use_tiles/deterministic (one being rewritten): the gate plans the
    autotuned path only and its summary says which kernels it could not force; jobs never run are "not run"."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_gate

    def flash_attention(q, k, v, *, causal=True, scale=None, key_padding_mask=None, segment_ids=None):
        raise AssertionError("not called by plan()")

    old = type("OldModule", (), {"flash_attention": staticmethod(flash_attention), "FWD_TILES": {64: [(64, 64, 4, 3)]}})
    monkeypatch.setattr(gpu_gate, "attention_module", lambda: old)
    args = gpu_gate.parse_args(["--out", str(tmp_path)])
    spec = gpu_gate.plan(args, "cpu")
    kinds = {j["kind"] for j in spec["jobs"]}
    assert kinds == {"probe", "lce", "ce_rows", "auto"}, kinds
    assert all(j["deterministic"] is None for j in spec["jobs"]), spec["jobs"]
    assert set(spec["not_forced"]) == {"fwd", "bwd", "dkdv", "dq"}, spec["not_forced"]
    gpu_gate.write_json(tmp_path / gpu_gate.PLAN_FILE, spec)
    first = spec["jobs"][0]
    (tmp_path / "gate-00.jsonl").write_text(f'{{"id": {first["id"]}, "status": "pass", "shard": 0}}\n{{"id": 1, "sta')
    assert gpu_gate.merge(tmp_path) == "INCOMPLETE"  # one job passed, the others never ran; a cut line is ignored
    summary = (tmp_path / gpu_gate.SUMMARY_FILE).read_text()
    assert summary.startswith(f"GATE: INCOMPLETE -- 1 of {len(spec['jobs'])} checks run"), summary
    assert "fwd   not forced: kernels/attention.py has no tile_lists/use_tiles" in summary, summary
    with (tmp_path / gpu_gate.CSV_FILE).open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows].count("not run") == len(spec["jobs"]) - 1, rows
