"""``fakescope provenance``: what image files say about their own origin (C2PA, IPTC, PNG chunks, EXIF)."""

from __future__ import annotations

import json
import os


def add_parser(sub):
    p = sub.add_parser("provenance", help="provenance metadata of image files: C2PA, IPTC source type, "
                                          "generator chunks, EXIF (evidence, not a verdict)")
    p.add_argument("paths", nargs="+", metavar="FILE")
    p.add_argument("--format", default="table", choices=["table", "json"])
    p.add_argument("--no-c2pa", action="store_true", help="skip C2PA manifests")
    return p


def run(args) -> int:
    from fakescope.data.io import list_images
    from fakescope.provenance import inspect_provenance

    files = list_images(args.paths)
    missing = [p for p in args.paths if not os.path.lexists(p)]
    rows = [{"path": p, "error": "file not found"} for p in missing]
    rows += [{"path": f, **inspect_provenance(f, use_c2pa=not args.no_c2pa)} for f in files]
    if args.format == "json":
        print(json.dumps(rows, indent=2, allow_nan=False))
    else:
        for r in rows:
            if "error" in r:
                print(f"{r['path']}: error: {r['error']}")
                continue
            print(f"{r['path']}: {r['generator_hint'] or 'no generator named in the metadata'}")
            for e in r["evidence"]:
                print(f"    {e}")
            for prob in r["problems"]:
                print(f"    problem: {prob}")
            if not r["c2pa_checked"]:
                print("    C2PA not checked (pip install 'fakescope[provenance]')")
        print("\nMetadata is evidence, not proof: it can be forged, and most re-uploads strip it "
              "(its absence says nothing).")
    return 0 if any("error" not in r for r in rows) else 1
