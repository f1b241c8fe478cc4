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


def test_each_list_of_choices_has_one_owner_that_argparse_and_config_use():
    """The command line's choices and the benchmark configuration's checks are the owners' lists
    (changing an owner changes them all): a copy typed by hand anywhere fails here."""
    import argparse

    from fakescope import LABELS, choices
    from fakescope.attacks import ATTACKS
    from fakescope.cli import build_parser
    from fakescope.data import transforms
    from fakescope.models import recipe
    from fakescope.study import config

    assert transforms.GEOMETRIES is recipe.GEOMETRIES is choices.GEOMETRIES
    assert recipe.LR_SCHEDULES is choices.LR_SCHEDULES

    def options(command: str) -> dict:
        sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        return {o: a.choices for a in sub.choices[command]._actions for o in a.option_strings if a.choices}

    train, attack, bench = options("train"), options("attack"), options("benchmark")
    assert train["--lr-schedule"] == list(choices.LR_SCHEDULES) and train["--task"] == list(choices.TASKS)
    assert train["--test-geometry"] == list(choices.GEOMETRIES) == options("evaluate")["--test-geometry"]
    assert attack["--attack"] == list(ATTACKS) == bench["--attack"]
    assert attack["--direction"] == list(choices.ATTACK_DIRECTIONS)
    for key, good in (("lr_schedule", choices.LR_SCHEDULES), ("task", choices.TASKS),
                      ("test_geometry", choices.GEOMETRIES)):
        for v in good:
            config.TOP_LEVEL[key](v)
        try:
            config.TOP_LEVEL[key]("nope")
        except ValueError as e:
            assert all(v in str(e) for v in good), e
        else:
            raise AssertionError(f"{key}: 'nope' accepted")
    from fakescope import export

    assert not hasattr(export, "LABEL_MAP") and LABELS == {"nature": 0, "ai": 1}


def test_the_library_imports_fakescope_at_module_level_only():
    """Function-local imports of fakescope modules hid import cycles that the import-linter contracts could
    not see; the library imports its own modules at the top, where the contracts and Python check them.
    Only the commands (the CLI's thin layer) import what each one needs inside its ``run``."""
    import ast

    local = []
    for path in sorted((SRC / "fakescope").rglob("*.py")):
        if "commands" in path.relative_to(SRC).parts:
            continue
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    mod = node.module if isinstance(node, ast.ImportFrom) else (
                        node.names[0].name if isinstance(node, ast.Import) else None)
                    if mod and mod.split(".")[0] == "fakescope":
                        local.append(f"{path.relative_to(SRC)}:{node.lineno} {mod}")
    assert not local, local
