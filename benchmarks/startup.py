"""How long lmforge's commands take to start: wall time of whole processes, beside ``import torch``.

Each command runs ``--repeat`` times (after one untimed run that warms the file cache) and the median is
reported, next to the anchors ``python -c "import torch"`` and ``python -c "import lightning"``:

- ``lmforge --help``, ``lmforge plugins``, ``lmforge export --help``: nothing to compute; they should not
  import Lightning (aim: under 1 s);
- ``lmforge generate CKPT --prompt ... --max-new-tokens 1`` on a tiny checkpoint: start-up plus one token
  (aim: within 1.5x of ``import torch``).

``--before DIR`` also runs every command from another checkout of lmforge (e.g. ``git worktree add
/tmp/before <commit>``), put first on ``PYTHONPATH``, so a change is measured side by side in one run.
Writes ``startup.csv`` and ``startup.png`` to ``--out``.

    python benchmarks/startup.py --repeat 5 --before /tmp/before
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness


def tiny_checkpoint(path: Path) -> Path:
    """A random 2-layer GPT with the byte tokenizer, in the format ``lmforge fit`` writes."""
    import torch

    import lmforge
    from lmforge.model import GPT, GPTConfig

    config = GPTConfig(vocab_size=320, block_size=64, n_layer=2, n_head=4, n_embd=64)
    model = GPT(config)
    meta = {"version": lmforge.__version__, "model_config": config.to_dict(), "tokenizer": {"type": "bytes"}}
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "lmforge": meta, "global_step": 0, "hyper_parameters": {}}, path)
    return path


def commands(ckpt: Path) -> dict[str, list[str]]:
    lm = [sys.executable, "-m", "lmforge"]
    return {
        "import torch": [sys.executable, "-c", "import torch"],
        "import lightning": [sys.executable, "-c", "import lightning"],
        "lmforge --help": [*lm, "--help"],
        "lmforge plugins": [*lm, "plugins"],
        "lmforge export --help": [*lm, "export", "--help"],
        "lmforge generate (1 token)": [*lm, "generate", str(ckpt), "--prompt", "The", "--max-new-tokens", "1"],
    }


def median_seconds(argv: list[str], repeat: int, env: dict[str, str], cwd: Path) -> float:
    subprocess.run(argv, env=env, cwd=cwd, capture_output=True, check=True)  # warm the file cache
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, env=env, cwd=cwd, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5, help="timed runs per command (median reported)")
    p.add_argument("--before", type=Path, help="another lmforge checkout to time side by side")
    harness.add_out_arg(p)
    args = p.parse_args()
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    trees = {"this checkout": None}
    if args.before is not None:
        if not (args.before / "lmforge" / "__init__.py").is_file():
            p.error(f"--before {args.before}: not an lmforge checkout (no lmforge/__init__.py)")
        trees = {"before": args.before.resolve(), **trees}
    print(harness.environment_line("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_checkpoint(Path(tmp) / "tiny.ckpt")
        table: dict[str, dict[str, float]] = {}
        for name, argv in commands(ckpt).items():
            for tree, path in trees.items():
                if name.startswith("import ") and tree != "this checkout":
                    continue  # the anchors do not depend on lmforge
                env = {**os.environ, "LMFORGE_CACHE": str(Path(tmp) / "cache")}
                if path is not None:
                    env["PYTHONPATH"] = f"{path}{os.pathsep}{env.get('PYTHONPATH', '')}"
                seconds = median_seconds(argv, args.repeat, env, Path(tmp))
                table.setdefault(name, {})[tree] = seconds
                rows.append({"command": name, "tree": tree, "seconds": round(seconds, 3), "repeat": args.repeat})
    torch_s = table["import torch"]["this checkout"]
    headers = ["command", *trees, "x import torch"]
    body = []
    for name, by_tree in table.items():
        cells = [f"{by_tree[t]:.2f} s" if t in by_tree else "" for t in trees]
        body.append([name, *cells, f"{by_tree['this checkout'] / torch_s:.2f}"])
    harness.print_table(headers, body)
    args.out.mkdir(parents=True, exist_ok=True)
    written = harness.write_csv(args.out / "startup.csv", rows)
    plotted = harness.plot_bars(
        args.out / "startup.png",
        {name.replace("lmforge ", ""): by_tree["this checkout"] for name, by_tree in table.items()},
        ylabel="seconds (median)",
        title=f"start-up, median of {args.repeat} runs",
        fmt="{:.2f}",
        figsize=(8, 3.5),
    )
    print(f"wrote {written}" + (f" and {args.out / 'startup.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
