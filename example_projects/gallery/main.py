"""The failure gallery through LightningCLI: `python main.py fit --config base.yaml --config configs/<entry>.yaml`."""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

import lightning_diag  # noqa: F401  (registers the callbacks' short names)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gallery import GalleryData, GalleryNet


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(GalleryNet, GalleryData, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
