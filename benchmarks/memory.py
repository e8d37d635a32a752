"""Estimated against measured peak training memory: ``lmforge estimate``'s figure beside what a real run allocates.

For each config it runs ``lmforge fit`` for a few steps (a small corpus, no validation, no checkpoint) and reads
the table ``fit`` prints at its end (``estimate vs measured``): on a GPU the estimate's peak (tensors only)
against ``torch.cuda.max_memory_allocated``, aim within 15%; the training time and the MFU it implies. On a CPU
the measured figure is the process's resident set, runtime included, so no accuracy is claimed there.
Writes ``memory.csv`` to ``--out``.

    python benchmarks/memory.py --configs gpt-small,gpt2-124m --steps 5
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parents[1]


def run_fit(config: str, steps: int, work: Path) -> dict[str, object]:
    """One short ``lmforge fit`` of ``configs/<config>.yaml``; the estimate-vs-measured row of its output."""
    cmd = [sys.executable, "-m", "lmforge", "fit", "-c", str(ROOT / "configs" / f"{config}.yaml"),
           "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
           "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(work / config),
           "--checkpoint.every_n_train_steps", "null", "--checkpoint.save_last", "false",
           "--data.dataset.size_bytes", "2000000"]  # fmt: skip
    env = {**os.environ, "LMFORGE_CACHE": str(work / "cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    out = proc.stdout + proc.stderr
    row: dict[str, object] = {"config": config, "steps": steps, "rc": proc.returncode}
    peak = re.search(r"^peak memory \(GiB\)\s+([\d.]+)\s+([\d.]+) \(([^)]*)\)\s+(\S+)", out, re.M)
    if peak:
        row.update(estimated_gib=float(peak[1]), measured_gib=float(peak[2]), measured_as=peak[3],
                   difference=peak[4] if peak[4] != "not" else "not comparable")  # fmt: skip
    mfu = re.search(r"^training time .*MFU ([\d.e-]+) achieved", out, re.M)
    if mfu:
        row["mfu_achieved"] = float(mfu[1])
    if proc.returncode != 0 or not peak:
        row["error"] = harness.short_error(RuntimeError(out.strip().splitlines()[-1] if out.strip() else "no output"))
    return row


def main() -> int:
    p = harness.bench_parser(__doc__, "gpt-tiny for 2 steps (the plumbing; on a CPU nothing is claimed)")
    p.add_argument("--configs", default="gpt-small,gpt2-124m", help="config names in configs/ (comma-separated)")
    p.add_argument("--steps", type=int, default=5, help="training steps per run (default 5)")
    harness.add_out_arg(p)
    args = p.parse_args()
    configs, steps = (["gpt-tiny"], 2) if args.quick else (args.configs.split(","), args.steps)
    print(harness.environment_line())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            rows.append(run_fit(config, steps, Path(tmp)))
            r = rows[-1]
            print(f"{config}: estimated {r.get('estimated_gib', '-')} GiB, measured {r.get('measured_gib', '-')} GiB "
                  f"({r.get('measured_as', r.get('error', ''))}), {r.get('difference', '')}", flush=True)  # fmt: skip
    headers = ["config", "estimated GiB", "measured GiB", "measured as", "difference", "MFU achieved"]
    harness.print_table(headers, [[r["config"], r.get("estimated_gib", "-"), r.get("measured_gib", "-"),
                                   r.get("measured_as", r.get("error", "-")), r.get("difference", "-"),
                                   r.get("mfu_achieved", "-")] for r in rows])  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    fields = ["config", "steps", "rc", "estimated_gib", "measured_gib", "measured_as", "difference", "mfu_achieved",
              "error"]  # fmt: skip
    print(f"wrote {harness.write_csv(args.out / 'memory.csv', [{k: r.get(k, '') for k in fields} for r in rows])}")
    return 0 if all(r["rc"] == 0 and "estimated_gib" in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
