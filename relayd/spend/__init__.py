"""Spend control: prices, per-key limits and budgets, and the usage report.

Money is integer micro-dollars everywhere (1 USD = 1_000_000). This package holds
the rules and never touches a socket, a client session or a file of state: the
ledger's SQL lives in :mod:`relayd.store`.

* :mod:`~relayd.spend.prices`: the price table (``conf/prices.toml`` shipped in the
  package, merged with the operator's file) and token counts read from any OpenAI
  ``usage`` object;
* :mod:`~relayd.spend.report`: ``relayd usage`` and ``relayd prices check``: grouping,
  table, JSON, CSV and the HTML page.
"""

from __future__ import annotations
