"""The ``lightning-diag`` command.

``lightning-diag report PATH`` reports on a run and exits non-zero when a finding reaches ``--fail-on``, so a CI
job can gate on a training run:

* ``PATH`` a ``diagnosis.json``: print its summary.
* ``PATH`` a directory holding logs (TensorBoard event files or Lightning's ``metrics.csv``, searched
  recursively, newest run first): diagnose the learning curves post-hoc (any run, also one without lightning_diag
  callbacks), merge the result with the run's own ``diagnosis.json`` when there is one, write ``diagnosis.json``
  and the plots into the run's directory and print the summary.
* ``PATH`` a directory with only a ``diagnosis.json`` somewhere below: print the newest one.

``lightning-diag doctor MODULE:CLASS [--datamodule MODULE:CLASS] [--config YAML]`` builds your LightningModule
(and datamodule; or both from a LightningCLI config), runs SanityCheck's checks on the first training batches
without training, prints the findings and exits 1 when one reaches ``--fail-on`` (``error`` by default): a CI gate
for model code. ``MODULE`` is an importable module or a path to a ``.py`` file.

``lightning-diag demo [NAME]`` trains one of the failure scenarios shipped in :mod:`lightning_diag.demo` (a few
seconds on the CPU), prints its diagnosis and writes ``diagnosis.html``; ``demo --list`` lists them.

``lightning-diag codes`` lists the finding codes.

``report --html`` also writes ``diagnosis.html`` next to the report; ``report --verbose`` prints each finding's
advice. ``--help``, ``codes`` and argument errors answer without importing torch: the commands import what they
need when they run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any

from lightning_diag.__about__ import __version__
from lightning_diag.core.verdict import fails
from lightning_diag.findings import (
    CODES,
    REPORT_FILENAME,
    SEVERITIES,
    Finding,
    build_report,
    format_summary,
    write_report,
)
from lightning_diag.report import posthoc

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
            f"no run logs (metrics.csv or TensorBoard event files) and no {REPORT_FILENAME} under {path!r}: "
            "point at a run directory."
        )
    raise FileNotFoundError(f"{path!r} does not exist.")


def _load(report_path: str) -> dict[str, Any]:
    with open(report_path, encoding="utf-8") as handle:
        report = json.load(handle)
    if not isinstance(report, dict) or "findings" not in report or "summary" not in report:
        raise ValueError(
            f"{report_path!r} is not a lightning_diag report (expected keys 'findings' and 'summary')."
        )
    return report


def _post_hoc(path: str, args: argparse.Namespace) -> tuple[dict[str, Any], str, dict[str, Any]] | None:
    """Diagnose the newest logged run under ``path``; ``None`` when there are no logs."""
    runs = posthoc.find_runs(path)
    if not runs:
        return None
    kind, location = runs[0]
    run_dir = os.path.dirname(location) if kind == "csv" else location
    existing_path = os.path.join(run_dir, REPORT_FILENAME)
    existing = _load(existing_path) if os.path.isfile(existing_path) else None
    series = posthoc.read_series(kind, location)
    try:
        found, plot_series = posthoc.diagnose_run(series, args.train_monitor, args.monitor, args.chance_loss)
    except KeyError as error:
        if existing is None or args.train_monitor is not None or args.monitor is not None:
            raise ValueError(f"cannot diagnose the curves of {location!r}: {error.args[0]}") from error
        # A run with its own report but no loss curves in its logs: the report alone, with a note.
        print(f"lightning-diag: no curve diagnosis for {location!r}: {error.args[0]}", file=sys.stderr)
        return existing, existing_path, {}
    kept = [Finding.from_dict(f) for f in existing["findings"]] if existing else []
    have = {f.code for f in kept}
    findings = kept + [f for f in found if f.code not in have]  # the callbacks' own findings win
    steps = [s for values in series.values() for s, _ in values]
    if existing:
        summary = existing["summary"]
        report = build_report(
            findings,
            status=summary["status"],
            global_step=summary["global_step"],
            epoch=summary["epoch"],
            error=summary.get("error"),
        )
    else:
        epochs = series.get("epoch", [])
        last_epoch = int(max(e for _, e in epochs)) if epochs else 0
        report = build_report(
            findings, status="post-hoc", global_step=max(steps, default=0), epoch=last_epoch
        )
    from lightning_diag.report import plots

    report["summary"]["logs"] = os.path.abspath(location)
    report["plots"] = plots.save_figures(plots.build_figures(plot_series, report["findings"]), run_dir)
    if args.html:
        from lightning_diag.report.html import HTML_FILENAME

        report["html"] = HTML_FILENAME
    return report, write_report(report, run_dir), plot_series


def _report(args: argparse.Namespace) -> int:
    path, fail_on = args.path, args.fail_on
    done = _post_hoc(path, args) if os.path.isdir(path) else None
    series: dict[str, Any] = {}
    if done is None:
        report_path = _find_report(path)
        report = _load(report_path)
    else:
        report, report_path, series = done
    if args.html:
        from lightning_diag.report.html import HTML_FILENAME, write_html

        report["html"] = HTML_FILENAME
        write_html(report, series, os.path.dirname(os.path.abspath(report_path)))
    print(format_summary(report, report_path, verbose=args.verbose))
    failing = [f for f in report["findings"] if fails(f["severity"], fail_on)]
    return EXIT_FINDINGS if failing else EXIT_OK


def _import(target: str) -> Any:
    """``module:Class`` or ``path/to/file.py:Class`` -> the object."""
    import importlib
    import importlib.util

    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{target!r} must look like 'package.module:Class' or 'path/to/file.py:Class'.")
    try:
        if module_name.endswith(".py"):
            path = os.path.abspath(module_name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{module_name!r} does not exist.")
            name = "_lightning_diag_doctor_" + os.path.splitext(os.path.basename(path))[0]
            module = sys.modules.get(name)
            if module is None or getattr(module, "__file__", None) != path:
                sys.path.insert(0, os.path.dirname(path))
                spec = importlib.util.spec_from_file_location(name, path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except (ImportError, SyntaxError) as error:
        raise ValueError(f"cannot import {module_name!r}: {type(error).__name__}: {error}") from error
    try:
        return getattr(module, attr)
    except AttributeError as error:
        raise ValueError(f"{module_name!r} has no attribute {attr!r}.") from error


def _doctor(args: argparse.Namespace) -> int:
    import lightning.pytorch as pl

    import lightning_diag.callbacks  # noqa: F401  (LightningCLI resolves `class_path: EarlyStop` in --config)
    from lightning_diag import _lightning
    from lightning_diag.core.sanity import run_checks

    model_class = _import(args.model)
    if not (isinstance(model_class, type) and issubclass(model_class, pl.LightningModule)):
        raise ValueError(f"{args.model!r} is not a LightningModule subclass.")
    dm_class = _import(args.datamodule) if args.datamodule else None
    if dm_class is not None and not (
        isinstance(dm_class, type) and issubclass(dm_class, pl.LightningDataModule)
    ):
        raise ValueError(f"{args.datamodule!r} is not a LightningDataModule subclass.")
    if args.config:
        import yaml
        from lightning.pytorch.cli import LightningCLI

        with open(args.config, encoding="utf-8") as handle:
            config = yaml.safe_load(handle) or {}
        if isinstance(config, dict) and config.get("data") is not None and dm_class is None:
            raise ValueError(
                f"{args.config!r} has a `data` section: name its class with --datamodule MODULE:CLASS."
            )

        cli = LightningCLI(
            model_class,
            dm_class,
            run=False,
            args=["--config", args.config, "--trainer.logger=false"],
            save_config_callback=None,
        )
        model, datamodule = cli.model, cli.datamodule
    else:
        model, datamodule = model_class(), dm_class() if dm_class is not None else None
    if datamodule is not None:
        datamodule.prepare_data()
        datamodule.setup("fit")
        source = datamodule
    else:
        source = model
    try:
        train_loader = source.train_dataloader()
    except Exception as error:  # Lightning raises MisconfigurationException when it is not implemented
        owner = type(source).__name__
        raise ValueError(f"{owner} has no usable train_dataloader(): {error}") from error
    batches = []
    for batch in train_loader:
        batches.append(batch)
        if len(batches) >= args.batches:
            break
    if not batches:
        raise ValueError("the train dataloader yielded no batch.")
    issues = run_checks(
        model,
        batches,
        lambda module, batch: _lightning.replay_training_step(None, module, batch, 0),
        copyable=lambda: _lightning.detached_trainer(model),
        overfit_batch_steps=args.overfit_steps,
    )
    findings = [
        Finding(
            code=i.code,
            severity=i.severity,
            message=i.message,
            step=0,
            epoch=0,
            evidence={
                k: v for k, v in i.evidence.items() if k != "pending"
            },  # no training follows to measure
            advice=i.advice,
            source="lightning-diag doctor",
        )
        for i in issues
    ]
    report = build_report(findings, status="checked", global_step=0, epoch=0)
    print(
        format_summary(report).replace(
            "lightning_diag: run checked at step 0 (epoch 0)",
            f"lightning-diag doctor: {model_class.__name__}",
        )
    )
    return EXIT_FINDINGS if any(fails(f.severity, args.fail_on) for f in findings) else EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from lightning_diag.demo import SCENARIOS

    if args.list or args.name is None:
        width = max(map(len, SCENARIOS))
        print(
            "lightning-diag demo NAME: a small run broken on purpose, diagnosed (a few seconds on the CPU)."
        )
        for name, scenario in SCENARIOS.items():
            print(f"  {name:<{width}}  {scenario.description}")
        return EXIT_OK
    if args.name not in SCENARIOS:
        raise ValueError(
            f"no demo named {args.name!r}; `lightning-diag demo --list` shows {sorted(SCENARIOS)}."
        )
    from lightning_diag.demo import run

    print(f"lightning-diag demo {args.name}: {SCENARIOS[args.name].description}", flush=True)
    trainer = run(args.name, args.root)
    html_path = os.path.join(trainer.log_dir, "diagnosis.html")
    print(f"lightning-diag demo: open {html_path} in a browser for the whole story.")
    return EXIT_OK


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
    report = sub.add_parser(
        "report",
        help="diagnose a run from its logs (TensorBoard / metrics.csv) or print a diagnosis.json",
    )
    report.add_argument("path", help="a run directory (searched for logs and reports) or a diagnosis.json")
    report.add_argument(
        "--monitor",
        help=f"the validation-loss key in the logs (default: first of {', '.join(posthoc.VAL_KEYS)})",
    )
    report.add_argument(
        "--train-monitor",
        help=f"the training-loss key in the logs (default: first of {', '.join(posthoc.TRAIN_KEYS)})",
    )
    report.add_argument(
        "--chance-loss",
        type=float,
        help="reference loss for under-fitting (e.g. ln(num_classes)); default: initial loss",
    )
    # the spellings before 0.2, kept working
    report.add_argument("--val-key", dest="monitor", help=argparse.SUPPRESS)
    report.add_argument("--train-key", dest="train_monitor", help=argparse.SUPPRESS)
    report.add_argument("--baseline", dest="chance_loss", type=float, help=argparse.SUPPRESS)
    report.add_argument("--html", action="store_true", help="also write diagnosis.html next to the report")
    report.add_argument("--verbose", action="store_true", help="print each finding's advice")
    report.add_argument(
        "--fail-on",
        choices=("never", *SEVERITIES),
        default="error",
        help="exit with status 1 when a finding of this severity or worse exists (default: error)",
    )
    doctor = sub.add_parser(
        "doctor", help="run the pre-flight sanity checks on a LightningModule without training (a CI gate)"
    )
    doctor.add_argument(
        "model", help="the LightningModule: 'package.module:Class' or 'path/to/file.py:Class'"
    )
    doctor.add_argument(
        "--datamodule", help="a LightningDataModule, same form (else the model's train_dataloader)"
    )
    doctor.add_argument("--config", help="a LightningCLI YAML config to build the model and datamodule from")
    doctor.add_argument("--batches", type=int, default=1, help="training batches the data checks look at")
    doctor.add_argument(
        "--overfit-steps",
        type=int,
        default=0,
        help="also train a copy on one batch for this many steps (0: off)",
    )
    doctor.add_argument(
        "--fail-on",
        choices=("never", *SEVERITIES),
        default="error",
        help="exit with status 1 when a finding of this severity or worse exists (default: error)",
    )
    demo = sub.add_parser(
        "demo", help="train a small run broken on purpose and show its diagnosis (seconds, CPU)"
    )
    demo.add_argument("name", nargs="?", help="the scenario (see --list)")
    demo.add_argument("--list", action="store_true", help="list the scenarios")
    demo.add_argument(
        "--root", default="lightning_diag_demo", help="where the logs and reports go (default: %(default)s)"
    )
    sub.add_parser("codes", help="list the finding codes and what they mean")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            return _report(args)
        if args.command == "doctor":
            return _doctor(args)
        if args.command == "demo":
            return _demo(args)
        return _codes()
    except (FileNotFoundError, ValueError, RuntimeError, json.JSONDecodeError) as error:
        print(f"lightning-diag: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
