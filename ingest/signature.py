"""X-Hub-Signature-256 verification over the raw body, constant time, several secrets at once."""

from __future__ import annotations

import hashlib
import hmac

from shared.signing import PREFIX as _PREFIX
from shared.signing import sign

__all__ = ["SignatureVerifier", "sign"]


class SignatureVerifier:
    """Checks `sha256=<hex HMAC-SHA256 of the body>` against every configured App Secret.

    The keyed HMAC state is built once per secret; each request only copies it. Every secret is
    tried whatever the outcome, so timing does not reveal which one matched.
    """

    def __init__(self, secrets: tuple[bytes, ...]) -> None:
        if not secrets:
            raise ValueError("at least one secret is required")
        self._macs = tuple(hmac.new(s, digestmod=hashlib.sha256) for s in secrets)

    def verify(self, header: str | None, body: bytes) -> bool:
        if not header or not header.startswith(_PREFIX):
            return False
        given = header[len(_PREFIX):].strip().lower().encode("ascii", "replace")
        matched = False
        for template in self._macs:
            mac = template.copy()
            mac.update(body)
            matched |= hmac.compare_digest(mac.hexdigest().encode("ascii"), given)
        return matched


_SIGNED_LENGTH = len(_PREFIX) + 64


def well_formed(header: str | None) -> bool:
    """Whether the header could be a signature at all (`sha256=` and 64 characters): checked
    before the body is read, so that a request without one is refused without buffering it.
    `verify` decides; this only has to be cheap."""
    return header is not None and header.startswith(_PREFIX) and len(header) == _SIGNED_LENGTH


