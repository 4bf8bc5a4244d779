"""The admin endpoint's status page: `status.html` beside this module (package data),
one self-contained HTML file (styles and script inline, no external assets) that polls
/status.json. Data goes into the DOM through textContent only (never innerHTML), so
nothing from the status can inject markup.

To change the page, edit `status.html`; `{nonce}` in it is replaced per response with
the Content-Security-Policy nonce that lets its one inline style and script run.
"""

from __future__ import annotations

import secrets
from functools import cache
from importlib.resources import files

#: The placeholder in status.html for the per-response Content-Security-Policy nonce.
NONCE_PLACEHOLDER = "{nonce}"


@cache
def page_template() -> str:
    """The text of status.html, read once (from the installed package, wheel or not)."""
    return files("tcpgc.ops").joinpath("status.html").read_text("utf-8")


def render() -> tuple[str, dict[str, str]]:
    """The page with a fresh nonce, and the response headers that go with it."""
    nonce = secrets.token_urlsafe(16)
    headers = {
        # Only our own inline script and style run; the page talks only to us.
        "Content-Security-Policy": (
            f"default-src 'none'; script-src 'nonce-{nonce}'; "
            f"style-src 'nonce-{nonce}'; connect-src 'self'; img-src data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        ),
        # The URL may carry ?token=: never send it on to anyone.
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
    }
    return page_template().replace(NONCE_PLACEHOLDER, nonce), headers
