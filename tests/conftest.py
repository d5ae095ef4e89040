from __future__ import annotations

import os
import warnings

import pytest

# Our own bugs must fail the tests: internal errors in hooks are raised, not contained (lightning_diag._containment).
os.environ["LIGHTNING_DIAG_STRICT"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")

# Known noise from torch 2.13 + lightning 2.6 that says nothing about our code.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    """Every test runs in its own directory, so default `lightning_logs/` and wandb dirs never leak."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return
