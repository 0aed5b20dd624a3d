"""Debian's chromium for the pages a person opens (the login page, the usage report).

Headless, sandbox off (the tests may run as root), and every background connection
off: this machine's network is closed, and a page test must reach loopback only.
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["CHROMEDRIVER", "CHROMIUM", "headless_args"]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def headless_args(profile: Path) -> list[str]:
    """chromium's command-line flags for one test, with a fresh profile directory."""
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
    ]
