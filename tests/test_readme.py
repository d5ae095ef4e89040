"""The README's Python blocks run as written, and its test command is the one .ci/run runs."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = Path(ROOT, "README.md").read_text(encoding="utf-8")


def test_python_blocks_run(tmp_path, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert "lightning_diag: run finished" in capsys.readouterr().out
    assert (tmp_path / "lightning_logs").exists()


def test_ci_runs_the_readme_test_command() -> None:
    command = (
        re.search(r"The tests \(what `\.ci/run` runs\):\n\n```bash\n(.*?)\n```", README).group(1).strip()
    )
    ci = Path(ROOT, ".ci", "run").read_text(encoding="utf-8")
    assert command in ci


def test_yaml_block_parses_with_lightning_cli(tmp_path) -> None:
    from lightning.pytorch.cli import LightningCLI

    from lightning_diag import EarlyStop, WarmupCosine
    from tests.helpers import Regression

    block = re.search(r"```yaml\n(.*?)```", README, flags=re.S).group(1)
    (tmp_path / "c.yaml").write_text(block)
    cli = LightningCLI(
        Regression, run=False, args=["--config", str(tmp_path / "c.yaml"), "--trainer.logger=false"]
    )
    kinds = {type(c) for c in cli.trainer.callbacks}
    assert {WarmupCosine, EarlyStop} <= kinds
