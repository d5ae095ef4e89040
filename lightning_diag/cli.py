"""The ``lightning-diag`` command.

``lightning-diag report PATH`` prints the summary of a ``diagnosis.json`` (a file, or a run directory searched
recursively for the newest one) and exits non-zero when a finding reaches ``--fail-on``, so a CI job can gate
on a training run. ``lightning-diag codes`` lists the finding codes.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from lightning_diag.__about__ import __version__
from lightning_diag.findings import CODES, REPORT_FILENAME, SEVERITIES, format_summary

__all__ = ["main"]

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2


def _find_report(path: str) -> str:
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        found = glob.glob(os.path.join(path, "**", REPORT_FILENAME), recursive=True)
        if found:
            return max(found, key=os.path.getmtime)
        raise FileNotFoundError(
            f"no {REPORT_FILENAME} under {path!r}: has a run with a lightning_diag callback finished there?"
        )
    raise FileNotFoundError(f"{path!r} does not exist.")


def _report(path: str, fail_on: str) -> int:
    report_path = _find_report(path)
    with open(report_path, encoding="utf-8") as handle:
        report = json.load(handle)
    if not isinstance(report, dict) or "findings" not in report or "summary" not in report:
        raise ValueError(
            f"{report_path!r} is not a lightning_diag report (expected keys 'findings' and 'summary')."
        )
    print(format_summary(report, report_path))
    if fail_on == "never":
        return EXIT_OK
    threshold = SEVERITIES.index(fail_on)
    failing = [f for f in report["findings"] if SEVERITIES.index(f["severity"]) >= threshold]
    return EXIT_FINDINGS if failing else EXIT_OK


def _codes() -> int:
    width = max(map(len, CODES))
    for code, meaning in CODES.items():
        print(f"{code:<{width}}  {meaning}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-diag", description="lightning_diag: training runs that debug themselves."
    )
    parser.add_argument("--version", action="version", version=f"lightning-diag {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="print the summary of a diagnosis.json (file or run directory)")
    report.add_argument("path", help="a diagnosis.json, or a directory to search for the newest one")
    report.add_argument(
        "--fail-on",
        choices=("never", *SEVERITIES),
        default="error",
        help="exit with status 1 when a finding of this severity or worse exists (default: error)",
    )
    sub.add_parser("codes", help="list the finding codes and what they mean")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            return _report(args.path, args.fail_on)
        return _codes()
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as error:
        print(f"lightning-diag: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
