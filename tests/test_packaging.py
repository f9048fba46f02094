"""`pip install .` (not editable) gives a working `cirlab`: the wheel carries conf/ and experiments/
inside the package. Builds the wheel from a copy of the tree, installs it into a folder of its own and
runs its `cirlab` script from elsewhere, so nothing of the checkout can be read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

from conftest import ROOT, run_group

SHIPPED = ("pyproject.toml", "setup.py", "README.md", "cirlab", "conf", "experiments")


def test_wheel_runs_cirlab_with_its_own_configs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SHIPPED:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    pip = [sys.executable, "-m", "pip", "-q"]
    run_group(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src],
        check=True,
        timeout=600,
    )
    (wheel,) = (tmp_path / "dist").glob("cirlab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"cirlab/py.typed", "cirlab/conf/config.yaml", "cirlab/conf/method/clip4cir.yaml"} <= set(names)
    assert "cirlab/conf/experiment/clip4cir_synthetic.yaml" in names

    site = tmp_path / "site"
    run_group([*pip, "install", "--no-deps", "--target", site, wheel], check=True, timeout=600)
    shutil.rmtree(src)
    env = {**os.environ, "PYTHONPATH": str(site)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def cirlab(*args: str) -> subprocess.CompletedProcess:
        cmd = [site / "bin" / "cirlab", "logger=none", *args]
        return run_group(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)

    proc = cirlab("method=clip4cir", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "name: clip4cir" in proc.stdout and "name: synthetic" in proc.stdout
    proc = cirlab("+experiment=crossmodal_synthetic", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "name: synthetic_captions" in proc.stdout
    where = run_group(
        [sys.executable, "-c", "import cirlab.cli as c; print(c.CONF)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.strip()
    assert where == str(site / "cirlab" / "conf")
