import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture
def run_cli(tmp_path):
    """Run ``lmforge ARGS`` in a subprocess with its own cache folder; returns CompletedProcess."""
    import subprocess

    def run(*args: str, timeout: float = 600, check: bool = False):
        env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "lmforge", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"lmforge {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run
