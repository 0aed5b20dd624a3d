"""Spend control: prices, per-key limits and budgets, and the usage report.

Money is integer micro-dollars everywhere (1 USD = 1_000_000). This package holds
the rules and never touches a socket, a client session or a file of state: the
ledger's SQL lives in :mod:`relayd.store`.

* :mod:`~relayd.spend.prices`: the price table (``conf/prices.toml`` shipped in the
  package, merged with the operator's file) and token counts read from any OpenAI
  ``usage`` object;
* :mod:`~relayd.spend.report`: ``relayd usage`` and ``relayd prices check``: grouping,
  table, JSON, CSV and the HTML page;
* :mod:`~relayd.spend.costs`: how each OpenAI route is metered;
* :mod:`~relayd.spend.estimate`: the reservation before a request, the charge after;
* :mod:`~relayd.spend.windows`: calendar budget windows in the configured zone;
* :mod:`~relayd.spend.control`: admission, settlement exactly once, the spool;
* :mod:`~relayd.spend.refusals`: the errors a refused admission answers with;
* :mod:`~relayd.spend.budget`: each key's budgets for the usage report.

Where it hooks in, and the ledger's design: docs/spend.md.
"""

from __future__ import annotations
