"""LightningCLI entry point: `python example_projects/digits/main.py fit --config example_projects/digits/config.yaml`."""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

import lightning_diag  # noqa: F401  (registers the callbacks' short names for `class_path: EarlyStop`)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import DigitsClassifier, DigitsDataModule


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(DigitsClassifier, DigitsDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
