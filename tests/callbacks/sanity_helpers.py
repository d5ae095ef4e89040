"""A small classifier and its broken variants, each with the finding SanityCheck must report for it."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def classification_data(
    n: int = 64, scale: float = 1.0, labels: str = "random", nan: bool = False
) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g) * scale
    y = torch.randint(0, 4, (n,), generator=g) if labels == "random" else torch.zeros(n, dtype=torch.long)
    if nan:
        x[3, 5] = float("nan")
    return TensorDataset(x, y)


def loader(shuffle: bool = False, **kwargs: Any) -> DataLoader:
    return DataLoader(classification_data(**kwargs), batch_size=16, shuffle=shuffle)


class Classifier(pl.LightningModule):
    """MLP 16 -> 32 -> 4 with cross-entropy; ``bug`` breaks it one way."""

    def __init__(self, bug: str = "", batchnorm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Linear(16, 32)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(32))
        layers += [nn.ReLU(), nn.Linear(32, 4)]
        self.net = nn.Sequential(*layers)
        self.unused = nn.Linear(32, 32) if bug == "unused_layer" else None
        self.bug = bug
        if bug == "overconfident_init":
            with torch.no_grad():
                self.net[-1].weight.mul_(200.0)
        if bug == "frozen":
            self.net.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bug == "batch_mixing":
            b = x.shape[0]
            x = x.reshape(16, b).t()  # a reshape that scrambles the batch dimension (the transpose-view bug)
        if self.bug == "detached_body":
            return self.net[-1](
                self.net[:-1](x).detach()
            )  # the body's features leave the graph: it never trains
        out = self.net(x)
        if self.bug == "detached":
            out = out.detach()
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss if loss.requires_grad else loss.requires_grad_()

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad] or [nn.Parameter(torch.zeros(1))]
        return torch.optim.Adam(params, lr=1e-3)


#: name -> (model kwargs, loader kwargs, the code SanityCheck must report, its severity after a one-step fit).
#: Symptoms (loss at init, input scale, labels) are info until a consequence follows; an unused layer in a model
#: that learns is info (the loss ignores it), one whose output reaches the loss through ``.detach()`` a warning; only what cannot be by design is an error.
BROKEN: dict[str, tuple[dict[str, Any], dict[str, Any], str, str]] = {
    "overconfident_init": ({"bug": "overconfident_init"}, {}, "loss_at_init", "info"),
    "unused_layer": ({"bug": "unused_layer"}, {}, "missing_gradients", "info"),
    "batch_mixing": ({"bug": "batch_mixing"}, {}, "batch_dependence", "warning"),
    "unnormalised_inputs": ({}, {"scale": 1000.0}, "input_scale", "info"),
    "single_class_labels": ({}, {"labels": "zeros"}, "label_distribution", "warning"),  # not shuffled: a fact
    "nan_in_data": ({}, {"nan": True}, "non_finite_input", "error"),
    "detached_graph": ({"bug": "detached"}, {}, "missing_gradients", "error"),
    "detached_body": ({"bug": "detached_body"}, {}, "missing_gradients", "warning"),
    "frozen_model": ({"bug": "frozen"}, {}, "cannot_overfit_batch", "error"),
}
