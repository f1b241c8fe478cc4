"""``fakescope cross``: GenImage's cross-generator protocol for one model."""

from __future__ import annotations

import argparse

from fakescope.commands import args as a
from fakescope.commands.benchmark import add_study_options, study_options

CROSS_HELP = """\
GenImage's cross-generator protocol for one model: train on each generator alone, test on every
generator -> an N x N accuracy matrix with row averages (DIR/cross/<model>.json, .md and .png).
--leave-one-out trains on all generators but one and tests on every generator (the diagonal is the
one left out). When DIR holds a benchmark, its report is refreshed to include the matrix."""


def add_parser(sub):
    c = sub.add_parser("cross", help="cross-generator accuracy matrix of one model (GenImage's protocol)",
                       description=CROSS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_options(c, models=False)
    c.add_argument("--leave-one-out", action="store_true", help="train on all generators but one, test on it")
    return c


def run(args) -> int:
    from fakescope.engine import runtime
    from fakescope.report.html import cross_tables
    from fakescope.report.tables import markdown
    from fakescope.study import run_cross

    base, over = study_options(args)
    file_models = base.get("models")
    entry = dict((file_models.get(args.model) or {}) if isinstance(file_models, dict) else {})
    entry.update(a.model_options_from_args(args))  # a label of the file's models keeps its options; flags win
    over["models"] = {args.model: entry}
    over.pop("leave_one_out", None)
    result = run_cross(base, args.model, leave_one_out=args.leave_one_out, **over)
    if runtime.is_main():
        print(markdown(*cross_tables(result)))
        print(f"\nmatrix: {result['outputs']['json']}  heatmap: {result['outputs']['png']}")
    return 0

