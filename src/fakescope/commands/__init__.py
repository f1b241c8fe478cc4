"""CLI glue for the study-level commands. Each module here exposes ``register(sub, kit)``, which
adds its sub-parser(s), and ``HANDLERS`` (command name -> function(args) -> exit code).

``kit`` carries the shared argument helpers of :mod:`fakescope.cli` (parser class, --data and
runtime options, number parsers), so every command validates its arguments the same way."""

from __future__ import annotations

from types import SimpleNamespace

from fakescope.commands import attack, benchmark

MODULES = (attack, benchmark)
HANDLERS: dict = {}


def add_parsers(sub, kit: SimpleNamespace) -> None:
    for m in MODULES:
        m.register(sub, kit)
        HANDLERS.update(m.HANDLERS)
