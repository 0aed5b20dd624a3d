"""Thin handlers: validate, decide the upstream call, hand the bytes to streams/."""

from __future__ import annotations

__all__: list[str] = []
