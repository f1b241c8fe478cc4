"""CLI glue for the study-level commands (attack, benchmark, cross); filled in by their issues."""

from __future__ import annotations

HANDLERS: dict = {}


def add_parsers(sub, parser_class, add_data, add_runtime, threshold, number, csv, positive_int) -> None:
    return None
