"""relayd's benchmark: ``python -m bench`` (see bench/README.md). Never run by CI."""

from __future__ import annotations
