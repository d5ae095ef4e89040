"""A real browser for the HTML report tests: Debian's Chromium, headless (``.ci/run`` installs it).

:func:`chromium` finds the binary; :func:`dump_dom` returns the DOM after the page loaded and :func:`screenshot`
writes a PNG, each in a fresh profile with the network-free flags the CI machine needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def chromium() -> str | None:
    """The Chromium binary, or ``None`` when none is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(binary: str, html: str | os.PathLike[str], *args: str) -> str:
    with tempfile.TemporaryDirectory(prefix="lightning-diag-chromium-") as profile:
        proc = subprocess.run(
            [binary, *FLAGS, f"--user-data-dir={profile}", *args, Path(html).resolve().as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def dump_dom(binary: str, html: str | os.PathLike[str]) -> str:
    """The serialised DOM of the loaded page (``--dump-dom``)."""
    return _run(binary, html, "--dump-dom")


def screenshot(
    binary: str,
    html: str | os.PathLike[str],
    png: str | os.PathLike[str],
    width: int = 1400,
    height: int = 1250,
) -> Path:
    """A PNG of the page at a laptop-sized window."""
    out = Path(png).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _run(binary, html, f"--window-size={width},{height}", f"--screenshot={out}")
    return out
