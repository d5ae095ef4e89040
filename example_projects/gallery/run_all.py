"""Run every gallery entry and check it reports what it claims: `python run_all.py [--root runs/gallery] [NAME ...]`.

Each entry runs in this process through LightningCLI (`main.py fit --config base.yaml --config
configs/<entry>.yaml`); its `diagnosis.json` must contain the entry's expected codes (the healthy entry: no
warning or error). Prints the README's gallery table, generated from these real runs, and exits 1 if an entry
does not report what it should.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gallery import GALLERY  # noqa: E402
from main import main as cli_main  # noqa: E402


def run_entry(name: str, root: str, extra: list[str]) -> dict:
    args = [
        "fit",
        "--config",
        os.path.join(HERE, "base.yaml"),
        "--config",
        os.path.join(HERE, "configs", f"{name}.yaml"),
        f"--trainer.logger.init_args.save_dir={root}",
        f"--trainer.default_root_dir={root}",
        *extra,
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        cli = cli_main(args)
    with open(os.path.join(cli.trainer.log_dir, "diagnosis.json"), encoding="utf-8") as handle:
        return json.load(handle)


def reported(report: dict) -> str:
    by_code: dict[str, str] = {}
    for f in report["findings"]:
        if f["severity"] != "info" or f["code"] in ("early_stopped", "overfitting", "input_scale"):
            by_code.setdefault(f["code"], f"`{f['code']}` ({f['source']})")
    return ", ".join(by_code.values()) or "nothing (healthy)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"entries to run (default: all of {', '.join(GALLERY)})"
    )
    parser.add_argument("--root", default="runs/gallery")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more LightningCLI arguments")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    failures = []
    rows = ["| entry | symptom | lightning_diag reports | what to change |", "|---|---|---|---|"]
    unknown = [n for n in args.names if n not in GALLERY]
    if unknown:
        parser.error(f"unknown entries {unknown}; choose from {list(GALLERY)}")
    for name in args.names or list(GALLERY):
        symptom, expected, change = GALLERY[name]
        report = run_entry(name, os.path.abspath(args.root), args.extra)
        codes = {f["code"] for f in report["findings"]}
        bad = [f["code"] for f in report["findings"] if f["severity"] in ("warning", "error")]
        ok = set(expected) <= codes and (bool(expected) or not bad)
        if not ok:
            failures.append(f"{name}: expected {sorted(expected) or 'no warning/error'}, got {sorted(codes)}")
        rows.append(f"| {name} | {symptom} | {reported(report)} | {change} |")
    print("\n".join(rows))
    for failure in failures:
        print("MISMATCH", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
