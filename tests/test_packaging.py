"""A wheel holds only the packages setuptools finds: every folder of modules needs an __init__.py."""

from pathlib import Path

from setuptools import find_packages

SRC = Path(__file__).resolve().parents[1] / "src"


def test_every_module_folder_is_a_package_a_wheel_would_contain():
    found = set(find_packages(str(SRC)))
    folders = {".".join(p.parent.relative_to(SRC).parts) for p in SRC.rglob("*.py") if "__pycache__" not in p.parts}
    assert {"fakescope.data", "fakescope.engine"} <= folders
    assert folders <= found, sorted(folders - found)
