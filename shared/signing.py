"""Facebook's webhook signature: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`.

The ingest checks it (ingest/signature.py); the forwarder signs what it sends the bot with it
(workers/forward.py), as do tests, `fbhook simulate` and the benchmarks.
"""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "sha256="


def sign(secret: bytes, body: bytes) -> str:
    """The header value Facebook would send for `body`, keyed with `secret`."""
    return PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()
