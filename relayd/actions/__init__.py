"""The GPT Actions face: what ChatGPT's Custom GPT Actions call.

ChatGPT sends JSON only and reads answers under its own limits (docs/chatgpt.md), so
these routes validate a JSON body (schemas.py), re-encode it for upstream
(wrappers.py, payload.py), answer within the time and size budget (answers.py,
fit.py), hand files back (handouts.py, handout_store.py), fetch the user's file
links (fetch.py, mime.py) and check the Actions document (lint.py). The
``/v1/proxy`` envelope lives here too (proxy.py, proxy_policy.py).

It shares the relaying floor (relayd/relay.py) with the OpenAI face in
``relayd/handlers/`` and never imports from it.
"""

from __future__ import annotations

__all__: list[str] = []
