"""What a non-editable install ships: pyproject.toml lists autofit's packages by hand (the policies live at the
top level and are mapped in), so a new subpackage missing from that list would vanish from the wheel."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_autofit_package_is_listed_for_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "autofit").rglob("__init__.py")}
    assert found - listed == set()
    assert "autofit.policies" in listed and any((ROOT / "policies").glob("*.yaml"))
