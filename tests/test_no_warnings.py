"""Our own code does not warn in normal use: the README's Python blocks run with every warning recorded, and none
comes from a lightning_diag module (PyTorch's "Converting a tensor with requires_grad=True to a scalar" was one)."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import lightning_diag

PACKAGE = os.path.dirname(os.path.abspath(lightning_diag.__file__))
README = Path(PACKAGE).parent.joinpath("README.md").read_text(encoding="utf-8")


def test_readme_snippets_raise_no_warning_from_our_modules(tmp_path, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings(
            "error", module=r"lightning_diag(\..*)?$"
        )  # a warning attributed to our code fails
        for block in blocks:
            exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    ours = [w for w in caught if os.path.abspath(w.filename).startswith(PACKAGE + os.sep)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
    assert "lightning_diag: run finished" in capsys.readouterr().out


def test_sanity_check_in_a_real_fit_raises_no_warning_from_our_modules(tmp_path) -> None:
    from lightning_diag import SanityCheck
    from tests.callbacks.sanity_helpers import Classifier, loader
    from tests.helpers import trainer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(
            max_steps=2, default_root_dir=str(tmp_path), callbacks=[SanityCheck(overfit_batch_steps=5)]
        )
        t.fit(Classifier(), loader())
    ours = [w for w in caught if os.path.abspath(w.filename).startswith(PACKAGE + os.sep)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
