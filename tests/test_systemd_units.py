"""The shipped units pass systemd's own checks (skipped where systemd-analyze is absent)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).parent.parent / "systemd"
ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def test_units_verify() -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", "relayd.service", "relayd.socket"],
        cwd=UNITS,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify warns about the ExecStart binary when relayd is not installed under /opt.
    problems = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and "/opt/relayd/venv/bin/relayd" not in line
    ]
    assert problems == []


def test_service_exposure_is_at_most_2() -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", "relayd.service"],
        cwd=UNITS,
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for relayd.service: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0


def test_stop_timeout_covers_twice_the_drain() -> None:
    unit = (UNITS / "relayd.service").read_text()
    stop = int(re.search(r"^TimeoutStopSec=(\d+)", unit, re.M).group(1))  # type: ignore[union-attr]
    from relayd.config import Settings

    assert stop > 2 * Settings().server.drain_timeout_s
