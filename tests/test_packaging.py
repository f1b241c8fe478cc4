"""A wheel holds only the packages setuptools finds: every folder of modules needs an __init__.py."""

from pathlib import Path

from setuptools import find_packages

SRC = Path(__file__).resolve().parents[1] / "src"


def test_every_module_folder_is_a_package_a_wheel_would_contain():
    found = set(find_packages(str(SRC)))
    folders = {".".join(p.parent.relative_to(SRC).parts) for p in SRC.rglob("*.py") if "__pycache__" not in p.parts}
    assert {"fakescope.data", "fakescope.engine"} <= folders
    assert folders <= found, sorted(folders - found)


def test_no_module_defines_a_top_level_name_twice():
    """A second ``def`` of the same name silently replaces the first (``_versions`` in engine/train.py was
    defined twice): every module-level function and class is defined once."""
    import ast
    from collections import Counter

    twice = []
    for path in sorted(SRC.rglob("*.py")):
        names = Counter(n.name for n in ast.parse(path.read_text(encoding="utf-8")).body
                        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))
        twice += [f"{path.relative_to(SRC)}: {name}" for name, k in names.items() if k > 1]
    assert not twice, twice
