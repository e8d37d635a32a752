"""lmforge installs as one distribution; the top-level kernels/ folder imports as lmforge.kernels."""

import ast
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path, env_path: str | None = None) -> str:
    env = {"PATH": "/usr/bin:/bin"}
    if env_path:
        env["PYTHONPATH"] = env_path
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_installed_install_maps_kernels_under_lmforge(tmp_path):
    """The current (editable) install: lmforge.kernels is the repository's kernels/ folder."""
    out = _python(
        "import importlib.util, lmforge.kernels as k; print(k.__file__); print(importlib.util.find_spec('kernels'))",
        cwd=tmp_path,
    )
    file, bare = out.splitlines()
    assert Path(file).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    assert bare == "None"  # no top-level `kernels` package that could collide with PyPI's


@pytest.mark.slow
def test_wheel_ships_kernels_as_lmforge_kernels(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("lmforge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lmforge/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # the wheel's copy, with site-packages behind it for torch and friends
    paths = f"{site}:{sysconfig.get_paths()['purelib']}"
    out = _python("import lmforge, lmforge.kernels as k; print(k.__file__); print(lmforge.__file__)", tmp_path, paths)
    assert all(line.startswith(str(site)) for line in out.splitlines()), out


def test_kernels_depend_on_torch_and_triton_only():
    allowed = {"torch", "triton", "__future__"} | set(sys.stdlib_module_names)
    for path in (ROOT / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"


def test_import_lmforge_is_light():
    out = _python(
        "import sys, lmforge; print(sorted(m for m in ('torch', 'lightning', 'lmforge.model') if m in sys.modules))",
        cwd=ROOT,
        env_path=None,
    )
    assert out == "[]"
