"""Run the diagnosis corpus: every scenario with the lightning_diag suite at default settings, then the scores.

    python benchmarks/diagnosis/run.py [--seeds 0 1 2] [--only NAME ...] [--fast] [--json out.json] [--markdown]
                                       [--write-docs]

``--write-docs`` writes the ``--markdown`` tables into ``docs/generated/corpus.md``, the one copy the documentation
includes (``python benchmarks/diagnosis/run.py --seeds 0 1 2 --write-docs`` regenerates it; all scenarios only).

The suite is added the way a user would: every exported lightning_diag callback that needs no task-specific
argument, at its defaults (``GradNormMonitor``, ``NaNGuard``, ``OverfitDetector``, ``SanityCheck``,
``SpeedMonitor``, ``SilentBugDetector``, ``HangWatchdog``, ``MemoryMonitor`` and ``ActivationMonitor`` where the
package has them), plus ``EarlyStop`` on the run's ``monitor`` (``OverfitDetector`` watches that key too).
``GradClip`` and ``WarmupCosine`` are left out: they change the optimisation (a clipped or re-scheduled run is a
different run), they do not diagnose it. Nothing is tuned per scenario.

Scores (see ``scenario.py`` for the labels):

- recall: failing runs with at least one expected code at warning/error severity;
- false-alarm rate: healthy runs with any warning/error finding;
- noise: unexpected warning/error codes on failing runs, per failing run (a code the report links to the
  detected cause through ``caused_by`` is a symptom shown under that cause, not noise; those are counted
  apart as ``linked``);
- primary: runs whose ``primary`` finding has an expected code (failing) or that have none (healthy);
- crashes: runs that died of an exception other than lightning_diag's own deliberate stops
  (``NonFiniteError``, ``SanityCheckError``) and the out-of-memory errors the memory scenarios model
  (status ``out_of_memory``: judged by their findings like any other run).

Scenarios marked ``isolated`` (the memory ones: they read the process RSS) run each in a fresh Python process;
the others share this one.

Targets (on every seed): recall >= 95%, false alarms 0, noise <= 0.1, crashes 0 (:data:`TARGETS`). The exit
status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os
import pathlib
import pkgutil
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if __package__ in (None, ""):  # run as a script: make `benchmarks.diagnosis` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

from benchmarks.diagnosis.scenario import Scenario  # noqa: E402

__all__ = ["TARGETS", "Result", "load_scenarios", "markdown", "run_scenario", "score", "suite"]

#: recall >= 0.95, false-alarm rate == 0, noise <= 0.1 unexpected codes per failing run, crashes == 0
TARGETS = {"recall": 0.95, "false_alarm_rate": 0.0, "noise": 0.1, "crashes": 0}
_LOUD = ("warning", "error")


@dataclasses.dataclass
class Result:
    """What one scenario at one seed produced."""

    name: str
    kind: str
    seed: int
    expected: list[str]
    found: list[str]  # warning/error codes
    info: list[str]  # info codes
    primary: str | None
    status: str  # finished / stopped (a deliberate lightning_diag stop) / crashed
    error: str | None
    seconds: float
    #: every finding as "severity code @step: message" (for reading a miss or a false alarm)
    details: list[str] = dataclasses.field(default_factory=list)
    #: unexpected warning/error codes whose every finding the diagnosis links (``caused_by``, transitively) to a
    #: finding with an expected code: symptoms of the detected cause, shown under it, not a second diagnosis
    linked: list[str] = dataclasses.field(default_factory=list)

    @property
    def detected(self) -> bool:
        return any(code in self.expected for code in self.found)

    @property
    def unexpected(self) -> list[str]:
        """Warning/error codes that are neither expected nor linked to an expected finding (the noise)."""
        return [code for code in self.found if code not in self.expected and code not in self.linked]

    @property
    def primary_ok(self) -> bool:
        """The report's primary finding has an expected code (failing runs) / there is none (healthy runs)."""
        return self.primary in self.expected if self.kind == "failure" else self.primary is None

    @property
    def ok(self) -> bool:
        if self.status == "crashed":
            return False
        return self.detected if self.kind == "failure" else not self.found


def load_scenarios(only: Iterable[str] | None = None, fast: bool = False) -> list[Scenario]:
    """Every ``SCENARIOS`` of every module in ``scenarios/`` (sorted by module, then as listed)."""
    from benchmarks.diagnosis import scenarios as package

    found: list[Scenario] = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        found.extend(getattr(module, "SCENARIOS", []))
    names = [s.name for s in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate scenario names: {duplicates}")
    if only:
        wanted = set(only)
        unknown = wanted - set(names)
        if unknown:
            raise ValueError(f"unknown scenario(s) {sorted(unknown)}; known: {names}")
        found = [s for s in found if s.name in wanted]
    if fast:
        found = [s for s in found if s.fast]
    return found


def suite(monitor: str | None) -> list[Any]:
    """The lightning_diag callbacks a user adds without task-specific arguments, at their defaults."""
    import lightning_diag as ld

    callbacks: list[Any] = [ld.SanityCheck(), ld.GradNormMonitor(), ld.NaNGuard(), ld.SpeedMonitor()]
    if hasattr(ld, "MemoryMonitor"):
        callbacks.append(ld.MemoryMonitor())
    silent = getattr(ld, "SilentBugDetector", None)
    if silent is not None:
        callbacks.append(silent())
    watchdog = getattr(ld, "HangWatchdog", None)
    if watchdog is not None:
        callbacks.append(watchdog())
    activations = getattr(ld, "ActivationMonitor", None)
    if activations is not None:
        callbacks.append(activations())
    if monitor is not None:
        callbacks.append(_with_monitor(ld.OverfitDetector, monitor))
        callbacks.append(ld.EarlyStop(monitor=monitor))
    return callbacks


def _with_monitor(cls: Any, monitor: str) -> Any:
    """``OverfitDetector`` on ``monitor`` (its argument is ``monitor`` after the rename, ``val_key`` before)."""
    import inspect

    params = inspect.signature(cls).parameters
    return cls(monitor=monitor) if "monitor" in params else cls(val_key=monitor)


def run_scenario(scenario: Scenario, seed: int) -> Result:
    """Fit one scenario in this process with the suite; never raises (a crash is a result)."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import CSVLogger

    import lightning_diag as ld
    from benchmarks.diagnosis.kit import fresh_heap
    from lightning_diag.findings import build_report

    os.environ.pop("LIGHTNING_DIAG_STRICT", None)
    fresh_heap()  # every scenario is one user's run: MemoryMonitor must see the RSS a new process would
    start = time.perf_counter()
    trainer = None
    status, error = "finished", None
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), _quiet_lightning():
                pl.seed_everything(seed, verbose=False)
                run = scenario.build(seed)
                kwargs = {
                    "accelerator": "cpu",
                    "devices": 1,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "enable_checkpointing": False,
                    "logger": CSVLogger(tmp, name="run"),
                    "default_root_dir": tmp,
                    "num_sanity_val_steps": 0,
                    **run.trainer_kwargs,
                }
                trainer = pl.Trainer(callbacks=[*run.extra_callbacks, *suite(run.monitor)], **kwargs)
                trainer.fit(
                    run.model, train_dataloaders=run.train_dataloaders, val_dataloaders=run.val_dataloaders
                )
        except (ld.NonFiniteError, ld.SanityCheckError) as exc:
            status, error = "stopped", f"{type(exc).__name__}: {str(exc)[:200]}"
        except torch.OutOfMemoryError as exc:  # the failure a memory scenario models (its run dies of it)
            status, error = "out_of_memory", f"{type(exc).__name__}: {str(exc)[:200]}"
        except Exception as exc:  # a crash of the run is a result, not a failure of the runner
            status, error = "crashed", f"{type(exc).__name__}: {str(exc)[:300]}"
        findings = ld.collect_findings(trainer) if trainer is not None else []
    report = build_report(findings, status="finished", global_step=0, epoch=0)
    primary = _primary_code(report)
    loud = sorted({f.code for f in findings if f.severity in _LOUD})
    linked = _linked_codes(report, scenario.expected)
    quiet = sorted({f.code for f in findings if f.severity == "info"} - set(loud))
    return Result(
        name=scenario.name,
        kind=scenario.kind,
        seed=seed,
        expected=list(scenario.expected),
        found=loud,
        info=quiet,
        primary=primary,
        status=status,
        error=error,
        seconds=round(time.perf_counter() - start, 2),
        details=[f"{f.severity} {f.code} @{f.step}: {f.message}" for f in findings],
        linked=linked,
    )


def run_one(scenario: Scenario, seed: int) -> Result:
    """One scenario at one seed: in a fresh process when it is ``isolated``, in this one otherwise."""
    return run_isolated(scenario, seed) if scenario.isolated else run_scenario(scenario, seed)


def run_isolated(scenario: Scenario, seed: int) -> Result:
    """:func:`run_scenario` in a fresh Python process (``scenario.isolated``): the RSS a memory scenario measures
    starts from a new process's, whatever the scenarios before it left in this one's allocator. A child that dies
    is a crashed result, as a crash in this process would be.
    """
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    code = (
        "import dataclasses, json, sys\n"
        "from benchmarks.diagnosis import run\n"
        f"scenario = run.load_scenarios([{scenario.name!r}])[0]\n"
        f"result = run.run_scenario(scenario, {seed})\n"
        "sys.stdout.write('\\n' + json.dumps(dataclasses.asdict(result)) + '\\n')\n"
    )
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    except subprocess.TimeoutExpired:
        tail = ["no result after 900 s"]
    else:
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines:
            return Result(**json.loads(lines[-1]))
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
    return Result(
        name=scenario.name,
        kind=scenario.kind,
        seed=seed,
        expected=list(scenario.expected),
        found=[],
        info=[],
        primary=None,
        status="crashed",
        error=f"child process: {tail[0][:300]}",
        seconds=round(time.perf_counter() - start, 2),
    )


def _primary_code(report: dict[str, Any]) -> str | None:
    primary = report.get("primary")
    if primary is None:
        return None
    for finding in report["findings"]:
        if finding.get("id") == primary:
            return str(finding["code"])
    return None


def _linked_codes(report: dict[str, Any], expected: Sequence[str]) -> list[str]:
    """Unexpected loud codes all of whose findings have an expected-code finding among their causes."""
    entries = {f["id"]: f for f in report["findings"]}

    def reaches_expected(entry: dict[str, Any]) -> bool:
        seen: set[str] = set()
        while entry.get("caused_by") and entry["caused_by"] not in seen:
            seen.add(entry["caused_by"])
            entry = entries[entry["caused_by"]]
            if entry["code"] in expected:
                return True
        return False

    loud = [f for f in report["findings"] if f["severity"] in _LOUD and f["code"] not in expected]
    codes = {f["code"] for f in loud}
    return sorted(c for c in codes if all(reaches_expected(f) for f in loud if f["code"] == c))


@contextlib.contextmanager
def _quiet_lightning() -> Any:
    import logging

    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def score(results: Sequence[Result]) -> dict[str, Any]:
    """Recall, false-alarm rate, noise, crashes and wall time of a set of results (one seed or several)."""
    failures = [r for r in results if r.kind == "failure"]
    healthy = [r for r in results if r.kind == "healthy"]
    detected = sum(r.detected and r.status != "crashed" for r in failures)
    alarms = sum(bool(r.found) for r in healthy)
    unexpected = sum(len(r.unexpected) for r in failures)
    return {
        "primary_ok": sum(r.primary_ok for r in results),
        "linked": sum(len(r.linked) for r in failures),
        "failures": len(failures),
        "healthy": len(healthy),
        "detected": detected,
        "recall": detected / len(failures) if failures else 1.0,
        "false_alarms": alarms,
        "false_alarm_rate": alarms / len(healthy) if healthy else 0.0,
        "unexpected": unexpected,
        "noise": unexpected / len(failures) if failures else 0.0,
        "crashes": sum(r.status == "crashed" for r in results),
        "seconds": round(sum(r.seconds for r in results), 1),
    }


def meets_targets(s: dict[str, Any]) -> bool:
    return (
        s["recall"] >= TARGETS["recall"]
        and s["false_alarm_rate"] <= TARGETS["false_alarm_rate"]
        and s["noise"] <= TARGETS["noise"]
        and s["crashes"] <= TARGETS["crashes"]
    )


def confusion(results: Sequence[Result]) -> dict[str, dict[str, int]]:
    """Per code: ``expected`` (failing runs labelled with it), ``hit`` (of those, found), ``noise`` (found on a
    failing run not labelled with it), ``false_alarm`` (found on a healthy run)."""
    table: dict[str, dict[str, int]] = {}

    def row(code: str) -> dict[str, int]:
        return table.setdefault(code, {"expected": 0, "hit": 0, "noise": 0, "false_alarm": 0})

    for r in results:
        if r.kind == "failure":
            for code in r.expected:
                row(code)["expected"] += 1
                row(code)["hit"] += code in r.found
            for code in r.unexpected:
                row(code)["noise"] += 1
        else:
            for code in r.found:
                row(code)["false_alarm"] += 1
    return dict(sorted(table.items()))


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def markdown(results: Sequence[Result]) -> str:
    """The two README tables: per seed (scores) and per code (confusion), in a stable format."""
    seeds = sorted({r.seed for r in results})
    lines = [
        "| seed | failing runs | recall | healthy runs | false alarms | noise (unexpected codes / failing run) "
        "| primary finding right | crashes | wall time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for seed in seeds:
        s = score([r for r in results if r.seed == seed])
        lines.append(
            f"| {seed} | {s['failures']} | {_pct(s['recall'])} ({s['detected']}/{s['failures']}) | {s['healthy']} "
            f"| {_pct(s['false_alarm_rate'])} ({s['false_alarms']}/{s['healthy']}) | {s['noise']:.2f} ({s['unexpected']}) "
            f"| {s['primary_ok']}/{s['failures'] + s['healthy']} | {s['crashes']} | {s['seconds']:.0f} s |"
        )
    lines += [
        "",
        "| code | failing runs labelled with it | found there | found on other failing runs (noise) | found on healthy runs |",
        "|---|---|---|---|---|",
    ]
    for code, row in confusion(results).items():
        lines.append(
            f"| `{code}` | {row['expected']} | {row['hit']} | {row['noise']} | {row['false_alarm']} |"
        )
    return "\n".join(lines)


#: the documentation's copy of the :func:`markdown` tables (``--write-docs``)
DOCS_TABLE = os.path.join(os.path.dirname(os.path.dirname(_HERE)), "docs", "generated", "corpus.md")


def write_docs(table: str, argv: Sequence[str], path: str = DOCS_TABLE) -> None:
    """Write ``table`` to the documentation's generated file, headed by the command that regenerates it."""
    command = shlex.join(["python", "benchmarks/diagnosis/run.py", *argv])
    header = (
        f"<!-- generated by `{command}` on {time.strftime('%Y-%m-%d')}: rerun it, do not edit by hand -->"
    )
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"{header}\n{table}\n")


def _row(r: Result) -> str:
    verdict = (
        "ok"
        if r.ok
        else ("CRASH" if r.status == "crashed" else ("MISS" if r.kind == "failure" else "FALSE ALARM"))
    )
    extra = f" unexpected={','.join(r.unexpected)}" if r.kind == "failure" and r.unexpected else ""
    err = f" [{r.status}: {r.error}]" if r.error else ""
    return (
        f"{r.name:34} s{r.seed} {r.kind:7} {verdict:11} found={','.join(r.found) or '-'} primary={r.primary or '-'}"
        f"{extra} ({r.seconds:.1f}s){err}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME")
    parser.add_argument("--fast", action="store_true", help="only the fast subset the test suite runs")
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument(
        "--write-docs", action="store_true", help="write the --markdown tables to docs/generated/corpus.md"
    )
    parser.add_argument("--verbose", action="store_true", help="print every finding of every run")
    args = parser.parse_args(argv)
    if args.write_docs and (args.only or args.fast):
        parser.error(
            "--write-docs needs the whole corpus (no --only, no --fast): the table documents all of it"
        )

    scenarios = load_scenarios(args.only, fast=args.fast)
    results: list[Result] = []
    for seed in args.seeds:
        for scenario in scenarios:
            result = run_one(scenario, seed)
            results.append(result)
            print(_row(result), flush=True)
            if args.verbose:
                for line in result.details:
                    print(f"      {line[:300]}")
    print()
    ok = True
    for seed in args.seeds:
        s = score([r for r in results if r.seed == seed])
        ok = ok and meets_targets(s)
        print(
            f"seed {seed}: recall {_pct(s['recall'])} ({s['detected']}/{s['failures']}), false alarms "
            f"{_pct(s['false_alarm_rate'])} ({s['false_alarms']}/{s['healthy']}), noise {s['noise']:.2f} "
            f"({s['unexpected']} unexpected, {s['linked']} linked symptoms), crashes {s['crashes']}, "
            f"primary right {s['primary_ok']}/{s['failures'] + s['healthy']}, {s['seconds']:.0f} s"
        )
    print()
    print(f"{'code':24} expected  hit  noise  false_alarm")
    for code, row in confusion(results).items():
        print(f"{code:24} {row['expected']:8} {row['hit']:4} {row['noise']:6} {row['false_alarm']:12}")
    if args.markdown:
        print()
        print(markdown(results))
    if args.write_docs:
        write_docs(markdown(results), sys.argv[1:] if argv is None else argv)
        print(f"wrote {DOCS_TABLE}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(
                {
                    "targets": TARGETS,
                    "scores": {
                        str(seed): score([r for r in results if r.seed == seed]) for seed in args.seeds
                    },
                    "confusion": confusion(results),
                    "results": [dataclasses.asdict(r) for r in results],
                },
                handle,
                indent=2,
            )
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
