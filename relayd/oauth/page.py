"""The login page: one small, self-contained HTML document (inline CSS, no script).

It says who asks (the client's name and the host its redirect URI points at) and
for what (the scopes), and takes the person's relay key once. Every value shown
is escaped; the request's parameters ride along in hidden fields, signed by the
CSRF token, so the POST is checked exactly as the GET was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Final

__all__ = ["HEADERS", "error_page", "login_page"]

# No caching (the page carries a CSRF token), no framing (clickjacking a login
# form), nothing loaded from anywhere: the page is one document.
HEADERS: Final = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

_STYLE: Final = """
body{font:16px/1.5 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d1f23}
main{max-width:28rem;margin:3rem auto;padding:2rem;background:#fff;border-radius:8px;
box-shadow:0 1px 4px rgba(0,0,0,.12)}
h1{font-size:1.35rem;margin:0 0 1rem}
dl{margin:0 0 1rem}dt{font-weight:600}dd{margin:0 0 .5rem;overflow-wrap:anywhere}
label{display:block;font-weight:600;margin:1rem 0 .25rem}
input[type=password]{width:100%;box-sizing:border-box;padding:.6rem;font:inherit;
border:1px solid #8a8f98;border-radius:4px}
.error{background:#fdecea;border:1px solid #b3261e;color:#6b1510;padding:.75rem;
border-radius:4px}
.actions{display:flex;gap:.75rem;margin-top:1.25rem}
button{font:inherit;padding:.6rem 1.2rem;border-radius:4px;border:1px solid #1a56c4;
cursor:pointer}
button[value=allow]{background:#1a56c4;color:#fff}
button[value=deny]{background:#fff;color:#1a56c4}
small{color:#555}
"""


def _document(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>"
    )


def login_page(
    *,
    relay_name: str,
    client_name: str,
    redirect_host: str,
    scopes: Sequence[str],
    offline: bool,
    hidden: Mapping[str, str],
    error: str | None = None,
) -> str:
    """The page asking for a relay key; ``error`` (already plain text) shown on top."""
    fields = "".join(
        f'<input type="hidden" name="{escape(name)}" value="{escape(value)}">'
        for name, value in hidden.items()
    )
    alert = f'<p class="error" role="alert" id="login-error">{escape(error)}</p>' if error else ""
    asked = ", ".join(scopes) if scopes else "everything your relay key may use"
    invalid = ' aria-invalid="true"' if error else ""
    keep = "<dd>Stay linked: the app may renew its access without asking again.</dd>"
    body = (
        f"<h1>Link an app to {escape(relay_name)}</h1>{alert}"
        "<dl>"
        f"<dt>App</dt><dd>{escape(client_name)}</dd>"
        f"<dt>Sends you back to</dt><dd>{escape(redirect_host)}</dd>"
        f"<dt>Asks to use</dt><dd>{escape(asked)}</dd>"
        f"{keep if offline else ''}"
        "</dl>"
        '<form method="post" autocomplete="off">'
        f"{fields}"
        '<label for="relay_key">Your relay key</label>'
        '<input type="password" id="relay_key" name="relay_key" required '
        f'autocomplete="current-password" aria-describedby="key-help"{invalid}>'
        '<small id="key-help">The app never sees your key: it gets a token that acts '
        "as your key until you revoke it or the key is changed.</small>"
        '<div class="actions">'
        '<button type="submit" name="action" value="allow">Link</button>'
        '<button type="submit" name="action" value="deny">Cancel</button>'
        "</div></form>"
    )
    return _document(f"Link an app to {relay_name}", body)


def error_page(relay_name: str, message: str) -> str:
    """A request relayd will not answer through its redirect (an unknown client,
    an unregistered redirect URI): the person reads why, the client hears nothing."""
    body = (
        f"<h1>This link request cannot go on</h1>"
        f'<p class="error" role="alert">{escape(message)}</p>'
        f"<p>Start again from the app, or ask the operator of {escape(relay_name)}.</p>"
    )
    return _document("Link request refused", body)
