"""LLM pre-training in miniature: a character-level transformer on Python's own standard-library source.

The corpus ships with every Python install (``inspect.getsource`` of a few stdlib modules), so nothing is
downloaded. Contiguous windows of ``seq_len + 1`` characters give (input, next-character target) pairs; the last
10% of the text is the validation set.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

MODULES = ("argparse", "textwrap", "difflib", "string", "json.decoder", "json.encoder")


def corpus(max_chars: int) -> str:
    import importlib

    text = "\n".join(inspect.getsource(importlib.import_module(name)) for name in MODULES)
    return text[:max_chars]


class Windows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` token ids: (ids[:-1], ids[1:])."""

    def __init__(self, ids: torch.Tensor, seq_len: int) -> None:
        self.ids, self.seq_len = ids, seq_len

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.ids[i * self.seq_len : (i + 1) * self.seq_len + 1]
        return chunk[:-1], chunk[1:]


class StdlibText(pl.LightningDataModule):
    """Character-level stdlib source.

    Args:
        seq_len: characters per training window.
        batch_size: windows per batch.
        max_chars: how much of the corpus to use.
    """

    def __init__(self, seq_len: int = 64, batch_size: int = 32, max_chars: int = 300_000) -> None:
        super().__init__()
        self.save_hyperparameters()
        text = corpus(max_chars)
        self.vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(self.vocab)}
        self.ids = torch.tensor([index[c] for c in text], dtype=torch.long)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def setup(self, stage: str) -> None:
        split = int(0.9 * len(self.ids))
        self.train_set = Windows(self.ids[:split], self.hparams.seq_len)
        self.val_set = Windows(self.ids[split:], self.hparams.seq_len)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(
            self.train_set, batch_size=self.hparams.batch_size, shuffle=True, generator=g, drop_last=True
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=64)


class CharTransformer(pl.LightningModule):
    """A small causal transformer (pre-norm, learned positions) over characters, trained with AdamW.

    Args:
        vocab_size: number of distinct characters (LightningCLI links it from the datamodule).
        d_model: width.
        n_layers: transformer blocks.
        n_heads: attention heads.
        seq_len: maximum context.
        lr: AdamW's peak learning rate (WarmupCosine schedules it).
        weight_decay: AdamW's weight decay.
    """

    def __init__(
        self,
        vocab_size: int = 128,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        seq_len: int = 64,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.zeros(1, seq_len, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True, activation="gelu"
        )
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf"), device=ids.device), diagonal=1)
        h = self.blocks(self.embed(ids) + self.pos[:, :t], mask=mask, is_causal=True)
        return self.head(self.norm(h))

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_bpc", loss / math.log(2))  # bits per character

    def configure_optimizers(self) -> Any:
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2 and "pos" not in n]
        no_decay = [p for n, p in self.named_parameters() if p.dim() < 2 or "pos" in n]
        return torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
            betas=(0.9, 0.95),
        )
