"""The wheel carries what an installed copy needs: every package (the explicit list in pyproject names each folder),
the migrations as ``personalize.migrations``, the C sources and the dashboard's pages; installed from the wheel
alone (no checkout on the path) it migrates a fresh database."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("personalize", "workers", "dashboard")


def _listed_packages() -> tuple[list[str], dict[str, str]]:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return tool["packages"], tool.get("package-dir", {})


def _package_folders() -> set[str]:
    found = set()
    for top in TOP_LEVEL:
        for init in (ROOT / top).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                found.add(".".join(init.parent.relative_to(ROOT).parts))
    return found


def test_pyproject_lists_every_package_folder() -> None:
    packages, mapped = _listed_packages()
    assert _package_folders() - set(packages) == set(), "add the new package to [tool.setuptools] packages"
    assert mapped == {"personalize.migrations": "migrations", "personalize.migrations.versions": "migrations/versions"}
    for package in packages:
        folder = ROOT / mapped.get(package, package.replace(".", "/"))
        assert (folder / "__init__.py").is_file(), package


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel built from a copy of the sources (the checkout gets no build/ or egg-info)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")
    for name in (*TOP_LEVEL, "migrations"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = out.glob("personalize-*.whl")
    return wheel


def test_an_installed_wheel_migrates_its_own_database(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "personalize/migrations/env.py",
        "personalize/migrations/script.py.mako",
        "personalize/migrations/versions/0001_initial_schema.py",
        "personalize/migrations/versions/0002_adapter_methods.py",
        "personalize/cpu/csrc/qlinear.c",
        "dashboard/pages_/comparison.py",
        "workers/__init__.py",
    ):
        assert needed in names, needed
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    db = tmp_path / "installed.db"
    script = (
        "import personalize.data.store as s, sqlalchemy as sa; "
        f"s.upgrade_database('sqlite:///{db}'); "
        "print(s.migrations_dir()); "
        f"print(sorted(sa.inspect(sa.create_engine('sqlite:///{db}')).get_table_names()))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    # -S keeps the venv's editable finder (which maps ``personalize`` to the checkout) out; the venv's
    # dependencies come back through the site-packages folder named on the path
    venv_site = next(Path(p) for p in sys.path if p.endswith("site-packages"))
    env["PYTHONPATH"] = f"{site}{os.pathsep}{venv_site}"
    run = subprocess.run(
        [sys.executable, "-S", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    where, tables = run.stdout.strip().splitlines()[-2:]
    assert Path(where).is_relative_to(site), where  # the wheel's own copy, not the checkout's
    assert {"users", "items", "adapters"} <= set(eval(tables))  # noqa: S307 - our own repr of a list of names
