"""The ``fakescope`` command line: a thin layer over the library.

Each command is a module of :mod:`fakescope.commands` with ``add_parser(sub)`` and ``run(args)``; this file
only assembles them. Every user error ends in one line on stderr and exit code 2; anything unexpected ends
in one line too, with a hint to rerun with ``--debug`` for the traceback."""

from __future__ import annotations

import os
import sys

from fakescope import __version__
from fakescope.commands import args as a
from fakescope.commands import (
    attack,
    benchmark,
    calibrate,
    cross,
    data,
    evaluate,
    explain,
    export,
    models,
    predict,
    provenance,
    serve,
    train,
)
from fakescope.errors import FakescopeError

COMMANDS = (models, data, train, evaluate, calibrate, predict, explain, provenance, export, attack, benchmark, cross,
            serve)


def build_parser() -> a.Parser:
    p = a.Parser(prog="fakescope", description="Train, evaluate, attack and serve detectors of AI-generated images.")
    p.add_argument("--version", action="version", version=f"fakescope {__version__}")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
    sub = p.add_subparsers(dest="command", required=True, parser_class=a.Parser)
    for module in COMMANDS:
        module.add_parser(sub).set_defaults(_handler=module.run)
    return p


def _passive_threads() -> None:
    """CPU thread teams wait asleep instead of spinning (effective when set before torch loads OpenMP;
    a user's own setting wins): a spinning team stalls at every operator while another process holds one
    of its cores, which made forward passes 2-6x slower on a shared 2-core CPU."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main(argv: list[str] | None = None) -> int:
    _passive_threads()
    args = build_parser().parse_args(argv)
    try:
        return args._handler(args)
    except FakescopeError as e:
        print(f"fakescope: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fakescope: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # e.g. an --out folder that cannot be written, a full disk: one line, no traceback
        if args.debug:
            raise
        print(f"fakescope: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug, or something we did not foresee: one line, the traceback on request
        if args.debug:
            raise
        print(f"fakescope: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
