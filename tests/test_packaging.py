"""The wheel holds every package: pyproject.toml lists them by hand (envs/ and policies/ are
mapped into rtlm_adapt), so a new subpackage must be added there, or a non-editable install
(``pip install rtlm-adapt``) lacks it while the editable dev install hides the gap."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapped = {folder: name for name, folder in config["package-dir"].items()}
    found = set()
    for folder, package in mapped.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *relative.parts]))
    assert found - listed == set(), f"add these to pyproject.toml's packages: {found - listed}"
    assert listed - found == set(), f"listed but not packages: {listed - found}"
