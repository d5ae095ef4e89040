from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from lightning_diag import EarlyStop, __version__
from lightning_diag.cli import main
from lightning_diag.findings import Finding, build_report, write_report
from tests.helpers import Scripted, loader, trainer


def report_with(tmp_path, severity: str) -> str:
    finding = Finding(code="loss_spike", severity=severity, message="m", step=1, epoch=0, source="T")
    return write_report(build_report([finding], status="finished", global_step=2, epoch=0), tmp_path / "run")


@pytest.mark.parametrize(
    ("severity", "fail_on", "code"),
    [
        ("error", "error", 1),
        ("warning", "error", 0),
        ("warning", "warning", 1),
        ("error", "never", 0),
        ("info", "warning", 0),
    ],
)
def test_report_exit_status_gates_on_severity(tmp_path, capsys, severity, fail_on, code) -> None:
    path = report_with(tmp_path, severity)
    assert main(["report", path, "--fail-on", fail_on]) == code
    assert "loss_spike" in capsys.readouterr().out


def test_report_finds_the_newest_in_a_run_directory(tmp_path, capsys) -> None:
    t = trainer(max_epochs=6, default_root_dir=str(tmp_path), callbacks=[EarlyStop("val_loss", patience=1)])
    t.fit(Scripted([3, 3, 3]), loader(n=16), loader(n=8))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "early_stopped" in out and os.path.join(str(tmp_path), "diagnosis.json") in out


def test_errors_are_clear(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert (
        "no run logs (metrics.csv or TensorBoard event files) and no diagnosis.json under"
        in capsys.readouterr().err
    )
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"a": 1}))
    assert main(["report", str(bad)]) == 2
    assert "is not a lightning_diag report" in capsys.readouterr().err


def test_codes_lists_the_contract(capsys) -> None:
    assert main(["codes"]) == 0
    assert "non_finite_loss" in capsys.readouterr().out


def test_console_script_is_installed() -> None:
    exe = shutil.which("lightning-diag") or os.path.join(os.path.dirname(sys.executable), "lightning-diag")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == f"lightning-diag {__version__}"


def plain_run(root, logger: str, scenario: str = "overfitting") -> None:
    """A plain Lightning run (no lightning_diag callback) logging to CSV or TensorBoard."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from tests.callbacks.curve_helpers import SCENARIOS, Net, loaders

    kwargs, _, _, epochs, _ = SCENARIOS[scenario]
    log = CSVLogger(root, name="run") if logger == "csv" else TensorBoardLogger(root, name="run")
    trainer(max_epochs=epochs, num_sanity_val_steps=0, logger=log).fit(Net(**kwargs), *loaders(scenario))


@pytest.mark.parametrize("logger", ["csv", "tensorboard"])
def test_report_diagnoses_a_plain_lightning_run_from_its_logs(tmp_path, capsys, logger) -> None:
    plain_run(tmp_path, logger)
    assert main(["report", str(tmp_path), "--fail-on", "warning"]) == 1  # overfitting is a warning
    out = capsys.readouterr().out
    assert "overfitting" in out and "lightning-diag report" in out
    run_dir = tmp_path / "run" / "version_0"
    report = json.loads((run_dir / "diagnosis.json").read_text())
    codes = {(f["code"], f["severity"]) for f in report["findings"]}
    assert ("overfitting", "warning") in codes
    assert {c for c, _ in codes} == {"overfitting"}
    warning = next(f for f in report["findings"] if f["severity"] == "warning")
    assert (
        warning["evidence"]["val_key"] == "val_loss"
        and warning["evidence"]["train_key"] == "train_loss_epoch"
    )
    assert warning["evidence"]["onset_x"] == warning["evidence"]["best_x"] + 1
    assert report["summary"]["status"] == "post-hoc" and report["plots"] == ["learning_curves.png"]
    assert (run_dir / "learning_curves.png").stat().st_size > 10_000


def test_report_on_a_healthy_plain_run_finds_nothing(tmp_path, capsys) -> None:
    plain_run(tmp_path, "csv", "healthy")
    assert main(["report", str(tmp_path), "--fail-on", "info"]) == 0
    assert "No findings" in capsys.readouterr().out


def test_report_key_errors_list_the_logged_keys(tmp_path, capsys) -> None:
    plain_run(tmp_path, "csv", "healthy")
    assert main(["report", str(tmp_path), "--val-key", "valid/loss"]) == 2
    err = capsys.readouterr().err
    assert "'valid/loss' is not in the logs" in err and "'val_loss'" in err and "'train_loss_epoch'" in err


def test_report_merges_with_the_callbacks_report(tmp_path, capsys) -> None:
    from lightning.pytorch.loggers import CSVLogger

    from tests.callbacks.curve_helpers import SCENARIOS, Net, loaders

    kwargs, _, _, epochs, _ = SCENARIOS["overfitting"]
    early = EarlyStop("val_loss", patience=8)
    t = trainer(
        max_epochs=epochs, num_sanity_val_steps=0, logger=CSVLogger(tmp_path, name="run"), callbacks=[early]
    )
    t.fit(Net(**kwargs), *loaders("overfitting"))
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--fail-on", "never"]) == 0
    report = json.loads((tmp_path / "run" / "version_0" / "diagnosis.json").read_text())
    sources = {f["code"]: f["source"] for f in report["findings"]}
    assert sources["early_stopped"] == "EarlyStop"  # kept from the run's own report
    assert sources["overfitting"] == "lightning-diag report"  # added from the logs
    assert report["summary"]["status"] == "finished"


DIGITS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_projects", "digits"
)
BROKEN_MODULE = """
import torch
from torch import nn
import lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset


class Broken(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(8, 3)
        self.unused = nn.Linear(8, 8)  # defined, never called

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)), batch_size=16)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Cut(Broken):
    def forward(self, x):
        return self.net(x + self.unused(x).detach())  # its output reaches the loss, its gradient never does


class Detached(Broken):
    def forward(self, x):
        return self.net(x).detach().requires_grad_()  # the loss reaches no parameter: nothing can learn


class NoData(Broken):
    def train_dataloader(self):
        return super(Broken, self).train_dataloader()
"""


def test_doctor_passes_the_digits_example(capsys) -> None:
    model = os.path.join(DIGITS, "digits.py") + ":DigitsClassifier"
    data = os.path.join(DIGITS, "digits.py") + ":DigitsDataModule"
    assert main(["doctor", model, "--datamodule", data, "--overfit-steps", "30"]) == 0
    assert "No findings" in capsys.readouterr().out
    config = os.path.join(DIGITS, "config.yaml")
    assert main(["doctor", model, "--datamodule", data, "--config", config]) == 0


def test_doctor_resolves_short_callback_names_in_the_command(tmp_path) -> None:
    """In the `lightning-diag` process the callbacks load lazily; a --config naming them by short name still parses."""
    model, data = (
        os.path.join(DIGITS, "digits.py") + f":{name}" for name in ("DigitsClassifier", "DigitsDataModule")
    )
    argv = ["doctor", model, "--datamodule", data, "--config", os.path.join(DIGITS, "config.yaml")]
    proc = subprocess.run(
        [sys.executable, "-c", STARTUP, *argv], capture_output=True, text=True, timeout=300, cwd=str(tmp_path)
    )
    assert proc.stderr.strip().splitlines()[-1].split()[1] == "0", proc.stderr[-3000:]
    assert "No findings" in proc.stdout


def test_doctor_fails_a_broken_model(tmp_path, capsys) -> None:
    (tmp_path / "broken_model.py").write_text(BROKEN_MODULE)
    # a model nothing can train is an error: exit 1 at the default --fail-on error
    assert main(["doctor", f"{tmp_path / 'broken_model.py'}:Detached"]) == 1
    assert "nothing can learn" in capsys.readouterr().out
    # an unused layer in a model that learns is info: reported, never a failure
    assert main(["doctor", f"{tmp_path / 'broken_model.py'}:Broken", "--fail-on", "warning"]) == 0
    out = capsys.readouterr().out
    assert "missing_gradients" in out and "unused.weight" in out
    # a layer whose output reaches the loss through .detach() is a warning: exit 1 only when asked to fail on those
    assert main(["doctor", f"{tmp_path / 'broken_model.py'}:Cut"]) == 0
    assert main(["doctor", f"{tmp_path / 'broken_model.py'}:Cut", "--fail-on", "warning"]) == 1
    # importable module form, from the current directory (the tests run in tmp_path)
    assert main(["doctor", "broken_model:Detached"]) == 1


def test_doctor_errors_are_clear(tmp_path, capsys) -> None:
    (tmp_path / "broken_model.py").write_text(BROKEN_MODULE)
    cases = [
        (["doctor", "no_such_module:X"], "cannot import 'no_such_module'"),
        (["doctor", "broken_model"], "must look like 'package.module:Class'"),
        (["doctor", "broken_model:Missing"], "has no attribute 'Missing'"),
        (["doctor", "torch.nn:Linear"], "is not a LightningModule subclass"),
        (["doctor", "broken_model:NoData"], "NoData has no usable train_dataloader()"),
        (
            ["doctor", "broken_model:Broken", "--datamodule", "broken_model:Broken"],
            "is not a LightningDataModule",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


STARTUP = (
    "import sys, time; start = time.perf_counter(); sys.argv = ['lightning-diag', *sys.argv[1:]]\n"
    "from lightning_diag.cli import main\n"
    "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as exit:\n    rc = exit.code\n"
    "heavy = sorted(m for m in ('torch', 'lightning', 'numpy', 'matplotlib') if m in sys.modules)\n"
    "print('RESULT', rc, ','.join(heavy) or '-', time.perf_counter() - start, file=sys.stderr)\n"
)


@pytest.mark.parametrize(
    ("argv", "code"), [(["--help"], 0), (["codes"], 0), (["report", "--bogus"], 2), (["demo", "--list"], 0)]
)
def test_start_up_without_torch(argv, code) -> None:
    timings = []
    for _ in range(3):  # the whole process, interpreter start included; best of 3 on a shared machine
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", STARTUP, *argv], capture_output=True, text=True, timeout=60
        )
        timings.append(time.perf_counter() - start)
        _, rc, heavy, _ = proc.stderr.strip().splitlines()[-1].split()
        assert int(rc) == code and heavy == "-", proc.stderr  # nothing heavy imported to answer
    assert min(timings) < 0.5, timings


def test_console_script_answers_help_without_torch() -> None:
    exe = shutil.which("lightning-diag") or os.path.join(os.path.dirname(sys.executable), "lightning-diag")
    out = subprocess.run(
        [sys.executable, "-X", "importtime", exe, "codes"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "lightning_diag.findings" in imported and "torch" not in imported and "lightning" not in imported
    assert "non_finite_loss" in out.stdout


def test_report_flags_use_the_new_names_and_keep_the_old_ones(tmp_path, capsys) -> None:
    plain_run(tmp_path, "csv", "healthy")
    assert main(["report", str(tmp_path), "--monitor", "valid/loss"]) == 2
    assert "the val loss key 'valid/loss' is not in the logs" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--train-monitor", "nope"]) == 2
    assert "the train loss key 'nope' is not in the logs" in capsys.readouterr().err
    args = [
        "report",
        str(tmp_path),
        "--val-key",
        "val_loss",
        "--train-key",
        "train_loss_epoch",
        "--baseline",
        "1",
    ]
    assert main(args) == 0  # the spellings before 0.2 still work
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    help_text = capsys.readouterr().out
    assert "--monitor" in help_text and "--chance-loss" in help_text and "--val-key" not in help_text


def test_report_verbose_prints_the_advice(tmp_path, capsys) -> None:
    finding = Finding("loss_spike", "warning", "m", step=1, epoch=0, advice=["look at batch 1"], source="T")
    path = write_report(build_report([finding], status="finished", global_step=2, epoch=0), tmp_path / "run")
    main(["report", path])
    assert "look at batch 1" not in capsys.readouterr().out
    main(["report", path, "--verbose"])
    assert "            - look at batch 1" in capsys.readouterr().out
