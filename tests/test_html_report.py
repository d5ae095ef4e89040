"""diagnosis.html: written at fit end and by `lightning-diag report --html`, self-contained, the primary finding
first, every finding with evidence and advice, the curves with the run's events marked; rendered by a real
browser (headless Chromium) and checked through its DOM."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest
from lightning.pytorch.loggers import MLFlowLogger

from lightning_diag import EarlyStop, GradNormMonitor, NaNGuard, OverfitDetector, SpeedMonitor, WarmupCosine
from lightning_diag.cli import main
from lightning_diag.findings import Finding, build_report
from lightning_diag.report.html import render
from lightning_diag.report.marks import event_markers
from tests import browser
from tests.callbacks.curve_helpers import SCENARIOS, Net, loaders
from tests.helpers import trainer

ROOT = Path(__file__).resolve().parent.parent


class Elements(HTMLParser):
    """Every start tag as ``(tag, attrs)``, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.items: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.items.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str | None = None, **attrs: str) -> list[dict[str, str]]:
        def matches(a: dict[str, str]) -> bool:
            for key, want in attrs.items():
                key = key.replace("_", "-").removesuffix("-")
                if key == "class":
                    if not set(want.split()) <= set(a.get("class", "").split()):
                        return False
                elif a.get(key) != want:
                    return False
            return True

        return [a for t, a in self.items if (tag is None or t == tag) and matches(a)]


def elements(page: str) -> Elements:
    parsed = Elements()
    parsed.feed(page)
    return parsed


def finding(code: str, severity: str, step: int, **extra: object) -> dict:
    f = Finding(
        code=code, severity=severity, message=f"{code} message", step=step, epoch=0, source="T"
    ).to_dict()
    f.update(extra)
    return f


def v2_report() -> dict:
    """A version-2 report as the diagnosis rules write it: a primary finding and caused-by links."""
    report = build_report([], status="finished", global_step=30, epoch=2)
    report["version"] = 2
    report["findings"] = [
        finding("loss_spike", "warning", 3, id="f1", caused_by=["f2"]),
        finding("overfitting", "warning", 9, id="f3"),
        finding(
            "exploding_gradients", "error", 5, id="f2", evidence={"action": "skip"}, count=3, last_step=8
        ),
    ]
    report["primary"] = "f2"
    report["summary"]["counts"] = {"info": 0, "warning": 2, "error": 1}
    return report


def test_primary_first_and_caused_by_links() -> None:
    page = elements(render(v2_report(), {}))
    cards = page.find("article", class_="finding")
    assert [c["data-code"] for c in cards] == ["exploding_gradients", "loss_spike", "overfitting"]
    assert "primary" in cards[0]["class"].split() and cards[0]["id"] == "finding-f2"
    (link,) = page.find("a", class_="cause")
    assert link["href"] == "#finding-f2" and link["data-code"] == "exploding_gradients"


def test_without_a_primary_the_findings_come_in_severity_order() -> None:
    report = v2_report()
    del report["primary"]
    cards = elements(render(report, {})).find("article", class_="finding")
    assert [c["data-code"] for c in cards] == ["exploding_gradients", "loss_spike", "overfitting"]
    assert not any("primary" in c["class"].split() for c in cards)
    report["findings"].append(finding("early_stopped", "info", 1))
    cards = elements(render(report, {})).find("article", class_="finding")
    assert [c["data-code"] for c in cards][-1] == "early_stopped"  # info last, though it came first in time


def test_events_are_marked_on_the_curves() -> None:
    report = v2_report()
    series = {
        "curve": [(1.0, 1.0, 1.1), (2.0, 0.6, 0.8), (3.0, 0.5, 0.9)],
        "curve_steps": [10, 20, 30],
        "lr": [(s, 0.1) for s in range(0, 30, 2)],
    }
    assert event_markers(report["findings"]) == [
        ("spike", 3, 3, 1, "loss_spike"),
        ("skip", 5, 8, 3, "exploding_gradients"),
    ]
    page = elements(render(report, series))
    curves = page.find("g", class_="event")
    assert {(g["data-kind"], g["data-code"]) for g in curves} == {
        ("spike", "loss_spike"),
        ("skip", "exploding_gradients"),
    }
    assert page.find("svg", id="lr-schedule") and page.find("polyline", class_="series lr")


def test_lr_back_offs_are_marked_only_after_a_rollback() -> None:
    lr = [(0, 0.1), (2, 0.099), (4, 0.098), (6, 0.0098), (8, 0.0097), (10, 0.00096)]
    guard = {"rollbacks": 1, "skipped_steps": 3, "lr_backoff": 0.1}
    report = build_report([], status="finished", global_step=10, epoch=0)
    page = elements(render(report, {"lr": lr, "nan_guard": guard}))

    def marks(page: Elements) -> list[dict[str, str]]:
        return [m for m in page.find("line", class_="marker backoff") if "key" not in m["class"].split()]

    assert len(marks(page)) == 1  # one rollback: one back-off marked, at the first fall (step 6)
    assert "LR back-off at step 6" in render(report, {"lr": lr, "nan_guard": guard})
    assert not marks(elements(render(report, {"lr": lr})))  # the same fall without a rollback: a schedule's


def test_the_memory_panel_marks_the_projection_and_the_oom() -> None:
    report = build_report(
        [], status="failed", global_step=60, epoch=2, error="OutOfMemoryError: CUDA out of memory"
    )
    memory = {
        "device": "cuda",
        "steps": list(range(0, 60, 5)),
        "baseline_mib": [1000.0 + 10 * s for s in range(0, 60, 5)],
        "peak_mib": [1500.0 + 10 * s for s in range(0, 60, 5)],
        "capacity_mib": 2400.0,
        "exhaustion_step": 145,
        "projection": [[55, 2050.0], [145, 2400.0]],
        "oom": [60, 2100.0],
    }
    page = elements(render(report, {"memory": memory}))
    assert page.find("svg", id="memory")
    for css in (
        "series baseline",
        "series peak",
        "series capacity",
        "series projection",
        "marker exhaustion",
    ):
        assert page.find(class_=css), css
    assert [m for m in page.find("line", class_="marker oom") if "key" not in m["class"].split()]
    text = render(report, {"memory": memory})
    assert "projected exhaustion at step 145" in text and "out of memory at step 60" in text
    far = {**memory, "projection": [[55, 2050.0], [100_000, 2400.0]], "exhaustion_step": 100_000}
    far_text = render(report, {"memory": far})  # too far to draw: named in the legend
    assert "projected exhaustion at step 100000 (beyond the chart)" in far_text
    assert not elements(far_text).find("polyline", class_="series projection")
    assert 'id="memory"' not in render(report, {"memory": {"steps": [], "oom": None}})


def test_the_page_is_self_contained() -> None:
    page = render(v2_report(), {"curve": [(1.0, 1.0, 1.1), (2.0, 0.6, 0.8)]})
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "<link" not in page and "src=" not in page


def fit_overfitting(tmp_path, **kwargs):
    scenario_kwargs, _, _, epochs, _ = SCENARIOS["overfitting"]
    t = trainer(
        max_epochs=epochs,
        num_sanity_val_steps=0,
        log_every_n_steps=2,
        default_root_dir=str(tmp_path),
        callbacks=[
            WarmupCosine(warmup_ratio=0.05),
            GradNormMonitor(depth=2),
            NaNGuard(),
            SpeedMonitor(window=4, ignore_first_steps=1),
            OverfitDetector(action="stop"),
            EarlyStop("val_loss", patience=100),
        ],
        **kwargs,
    )
    t.fit(Net(**scenario_kwargs), *loaders("overfitting"))
    return t


def test_written_at_fit_end_with_every_finding_and_plot(tmp_path, capsys) -> None:
    fit_overfitting(tmp_path)
    report = json.loads((tmp_path / "diagnosis.json").read_text())
    assert report["html"] == "diagnosis.html"
    page_text = (tmp_path / "diagnosis.html").read_text()
    page = elements(page_text)
    codes = [c["data-code"] for c in page.find("article", class_="finding")]
    assert sorted(codes) == sorted(f["code"] for f in report["findings"]) and "overfitting" in codes
    for ident in ("learning-curves", "lr-schedule", "grad-norms", "data-wait"):
        assert page.find("svg", id=ident), ident
    for css in ("series train", "series val", "marker best", "marker onset", "marker stop"):
        assert page.find(class_=css), css
    assert page.find("rect", class_="cell") and page.find("rect", class_="wait")
    for f in report["findings"]:  # evidence and advice of each finding are on the page
        assert all(a.replace("'", "&#x27;").replace('"', "&quot;")[:40] in page_text for a in f["advice"])
    out = capsys.readouterr().out
    assert f"Open in a browser: {tmp_path / 'diagnosis.html'}" in out


def test_logged_as_an_mlflow_artifact(tmp_path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="html", tracking_uri=uri)
    t = trainer(
        max_epochs=2,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        logger=logger,
        callbacks=[OverfitDetector()],
    )
    t.fit(Net(), *loaders("healthy"))
    client = MlflowClient(uri)
    assert "diagnosis.html" in {a.path for a in client.list_artifacts(logger.run_id)}
    local = client.download_artifacts(logger.run_id, "diagnosis.html", str(tmp_path / "down"))
    assert "lightning_diag diagnosis" in Path(local).read_text()


def test_report_html_from_a_diagnosis_json(tmp_path, capsys) -> None:
    report = build_report(
        [Finding("loss_spike", "warning", "spiky", step=4, epoch=0, advice=["look at batch 4"], source="T")],
        status="finished",
        global_step=9,
        epoch=0,
    )
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "diagnosis.json").write_text(json.dumps(report))
    assert main(["report", str(tmp_path / "run" / "diagnosis.json"), "--html", "--fail-on", "never"]) == 0
    page = (tmp_path / "run" / "diagnosis.html").read_text()
    assert 'data-code="loss_spike"' in page and "look at batch 4" in page
    assert "Open in a browser:" in capsys.readouterr().out


# -- a real browser -----------------------------------------------------------------------------------------
def need_chromium() -> str:
    binary = browser.chromium()
    if binary is not None:
        return binary
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(
            "CI=true but Chromium is not installed: `.ci/run` installs it (apt-get install -y chromium)."
        )
    pytest.skip(
        "Chromium is not installed here (apt-get install chromium); .ci/run installs it and CI runs this test."
    )


def run_overfit_example(root: Path) -> Path:
    spec = importlib.util.spec_from_file_location(
        "overfit_example", ROOT / "example_projects" / "curves" / "overfit.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    t = module.main(["--root", str(root)])
    return Path(t.log_dir)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.slow
def test_the_overfitting_example_renders_in_chromium(tmp_path) -> None:
    binary = need_chromium()
    run_dir = run_overfit_example(tmp_path / "runs")
    report = json.loads((run_dir / "diagnosis.json").read_text())
    dom = elements(browser.dump_dom(binary, run_dir / "diagnosis.html"))
    cards = dom.find("article", class_="finding")
    assert {c["data-code"] for c in cards} == {f["code"] for f in report["findings"]}
    assert cards[0]["data-severity"] == "warning" and cards[0]["data-code"] == "overfitting"
    for ident in ("learning-curves", "lr-schedule", "grad-norms"):
        assert dom.find("svg", id=ident), ident
    for css in ("series train", "series val", "marker best", "marker onset", "marker stop"):
        assert dom.find(class_=css), css
    png = browser.screenshot(binary, run_dir / "diagnosis.html", tmp_path / "diagnosis.png")
    assert png_size(png) == (1400, 1250) and png.stat().st_size > 50_000  # something was drawn
    target = os.environ.get("LIGHTNING_DIAG_SCREENSHOT")
    if target:  # how docs/images/diagnosis_html.png is made
        shutil.copyfile(png, target)


def test_logged_as_a_wandb_html_panel(tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lightning_diag_html")
    try:
        t = trainer(
            max_epochs=2,
            num_sanity_val_steps=0,
            default_root_dir=str(tmp_path),
            logger=logger,
            callbacks=[OverfitDetector()],
        )
        t.fit(Net(), *loaders("healthy"))
    finally:
        import wandb

        wandb.finish()
    (panel,) = tmp_path.rglob("media/html/diag/diagnosis_html_*.html")
    assert 'id="learning-curves"' in panel.read_text()


def test_report_html_from_a_runs_logs(tmp_path, capsys) -> None:
    from tests.test_cli import plain_run

    plain_run(tmp_path, "csv")
    assert main(["report", str(tmp_path), "--html", "--fail-on", "never"]) == 0
    page = elements((tmp_path / "run" / "version_0" / "diagnosis.html").read_text())
    assert page.find("article", class_="finding")[0]["data-code"] == "overfitting"
    assert page.find("polyline", class_="series val") and page.find("line", class_="marker onset")
    assert (
        json.loads((tmp_path / "run" / "version_0" / "diagnosis.json").read_text())["html"]
        == "diagnosis.html"
    )


def test_a_failing_page_never_breaks_the_run(tmp_path, monkeypatch) -> None:
    from lightning_diag import LightningDiagWarning
    from lightning_diag.report import html as html_report

    def broken(*args: object) -> str:
        raise RuntimeError("no space left")

    monkeypatch.setattr(html_report, "write_html", broken)
    t = trainer(
        max_epochs=1, num_sanity_val_steps=0, default_root_dir=str(tmp_path), callbacks=[OverfitDetector()]
    )
    with pytest.warns(LightningDiagWarning, match="could not write diagnosis.html .*no space left"):
        t.fit(Net(), *loaders("healthy"))
    assert t.state.finished and (tmp_path / "diagnosis.json").exists()


def test_the_browser_test_skips_only_outside_ci(monkeypatch) -> None:
    monkeypatch.setattr(browser, "chromium", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Chromium is not installed"):
        need_chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true but Chromium is not installed"):
        need_chromium()
