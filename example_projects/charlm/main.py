"""LightningCLI entry point: `python main.py fit --config config.yaml` (bf16 on CPU; `--trainer.precision 16-mixed`
on a GPU)."""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import lightning_diag  # noqa: F401  (registers the callbacks' short names)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from charlm import CharTransformer, StdlibText


class CLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.seq_len", "model.seq_len")


def main(args: list[str] | None = None) -> LightningCLI:
    return CLI(CharTransformer, StdlibText, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
