"""One set of numbers: the console, diagnosis.json, the plots and the HTML report of one run agree on the epochs
(counted as Lightning's progress bar counts them) and on the best value (the one EarlyStop restored)."""

from __future__ import annotations

import json
import re

from lightning.pytorch.callbacks import TQDMProgressBar

from lightning_diag import EarlyStop, OverfitDetector
from lightning_diag.report import plots
from tests.helpers import Scripted, loader, trainer

# `val_loss` per epoch: 0.499 beats 0.5 by less than min_delta=0.01, so patience counts it as no improvement, but it
# is the best value seen, and the weights EarlyStop restores are epoch 2's.
VALUES = [1.0, 0.5, 0.499, 0.6, 0.7, 0.8, 0.9, 1.0]


def test_console_json_plots_and_html_agree(tmp_path, capsys) -> None:
    early = EarlyStop("val_loss", patience=3, min_delta=0.01)
    detector = OverfitDetector()
    t = trainer(
        max_epochs=len(VALUES),
        enable_progress_bar=True,
        default_root_dir=str(tmp_path),
        callbacks=[detector, early, TQDMProgressBar()],  # the bar whose "Epoch N:" lines are read below
    )
    t.fit(Scripted(VALUES), loader(n=32), loader(n=8))
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "diagnosis.json").read_text())

    # epochs: the last one the bar showed is the run's epoch everywhere
    bar_epoch = max(int(e) for e in re.findall(r"Epoch (\d+):", out))
    header = re.search(r"lightning_diag: run finished at step (\d+) \(epoch (\d+)\)", out)
    assert header and int(header.group(2)) == bar_epoch == report["summary"]["epoch"]
    (stopped,) = [f for f in report["findings"] if f["code"] == "early_stopped"]
    assert stopped["epoch"] == bar_epoch and f"Training stopped at epoch {bar_epoch}:" in stopped["message"]
    assert stopped["evidence"]["stopped_epoch"] == bar_epoch

    # best: the value restored, at the epoch restored, in the console, the JSON, the plot and the page
    restored = re.search(
        r"EarlyStop: restored the best weights \(`val_loss` = ([0-9.]+) at epoch (\d+)\)", out
    )
    assert restored, out[-2000:]
    value, epoch = restored.group(1), int(restored.group(2))
    assert (float(value), epoch) == (
        round(min(VALUES), 6),
        VALUES.index(min(VALUES)),
    )  # the truth of the script
    assert stopped["message"].endswith(f"Best {value} at epoch {epoch}: the weights restored.")
    # the patience counted from epoch 1's 0.5 (0.499 beat it by less than min_delta): the message says so
    assert "did not beat 0.5 at epoch 1 by more than 0.01" in stopped["message"]
    assert "the best value seen, 0.499 at epoch 2, beat it by less than `min_delta`" in stopped["message"]
    assert f"{stopped['evidence']['best_score']:.6g}" == value and stopped["evidence"]["best_epoch"] == epoch
    assert stopped["evidence"]["restored_epoch"] == epoch
    series = {**detector.report_series(), **early.report_series()}
    figure = plots.build_figures(series, report["findings"])["learning_curves"]
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    best_label = f"best val {value} (epoch {epoch}, restored)"
    assert best_label in labels
    (best_marker,) = [c for c in figure.axes[0].collections if c.get_label() == best_label]
    x, y = best_marker.get_offsets()[0]
    assert x == epoch and f"{y:.6g}" == value
    assert best_label in (tmp_path / "diagnosis.html").read_text()
    assert f"stopped (epoch {bar_epoch})" in labels
