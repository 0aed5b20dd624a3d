"""The ChatGPT apps face: relayd as a remote MCP server (docs/chatgpt.md#chatgpt-apps).

``POST /mcp`` speaks MCP's Streamable HTTP, stateless (transport.py), one JSON-RPC
message per request, with a method table per protocol era (protocol.py). Its tools
are the Actions operations of the route table seen a third way (tools.py); a call
runs the route's own handler through relayd/operations.py, within the answer budget
and joined by identical repeats (calls.py), and its answer becomes a tool result
(results.py).

It never imports the other faces (``relayd/actions/``, ``relayd/handlers/``): it
reaches their operations through the route table.
"""

from __future__ import annotations

__all__: list[str] = []
