"""relayd's own TLS pair: read the certificate and key files and say what is wrong.

``serve``, ``check-config`` and a SIGHUP reload all read the pair through
:func:`read_pair`, so each refuses the same things in the same words: a file that
cannot be read, one that holds no certificate or no unencrypted private key, a key
for another certificate, a certificate outside its validity period
(docs/security.md#own-tls). The validity dates come from ``cryptography``: the
standard library has no public way to read them from a file.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from relayd.config.casts import ConfigError

__all__ = ["EXPIRY_WARNING_DAYS", "Certificate", "expiry_warning", "read_pair"]

# certbot renews 30 days before expiry; 14 days left means renewal has failed
# at least twice (issue 13).
EXPIRY_WARNING_DAYS: Final = 14


@dataclass(frozen=True, slots=True)
class Certificate:
    """What relayd reports about the certificate it serves."""

    path: str
    subject: str
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime


def read_pair(cert_file: str, key_file: str, now: dt.datetime | None = None) -> Certificate:
    """The first certificate of ``cert_file``, checked against ``key_file`` and the
    clock; raises ConfigError naming the file and the fault."""
    cert_pem = _read(cert_file, "TLS certificate")
    key_pem = _read(key_file, "TLS key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ConfigError(
            f"TLS certificate file {cert_file!r} holds no PEM certificate "
            "(-----BEGIN CERTIFICATE-----)"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(
            f"TLS key file {key_file!r} is encrypted; relayd needs it without a passphrase "
            "(0600, root-owned, or a systemd credential)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"TLS key file {key_file!r} holds no PEM private key") from None
    if key.public_key() != cert.public_key():
        raise ConfigError(
            f"TLS key file {key_file!r} does not match the certificate in {cert_file!r} "
            "(it is the key of another certificate)"
        )
    now = now or dt.datetime.now(dt.UTC)
    facts = Certificate(
        path=cert_file,
        subject=cert.subject.rfc4514_string(),
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )
    if now >= facts.not_after:
        raise ConfigError(
            f"TLS certificate {cert_file!r} expired on {_day(facts.not_after)}; "
            "renew it (certbot renew) and reload"
        )
    if now < facts.not_before:
        raise ConfigError(
            f"TLS certificate {cert_file!r} is not valid before {_day(facts.not_before)} "
            "(check this machine's clock)"
        )
    return facts


def expiry_warning(facts: Certificate, now: dt.datetime | None = None) -> str | None:
    """A warning when fewer than EXPIRY_WARNING_DAYS are left."""
    left = facts.not_after - (now or dt.datetime.now(dt.UTC))
    if left >= dt.timedelta(days=EXPIRY_WARNING_DAYS):
        return None
    return (
        f"TLS certificate {facts.path!r} expires in {left.days} days "
        f"({_day(facts.not_after)}): renew it (certbot renew), then systemctl reload relayd"
    )


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path!r}: {exc.strerror}") from None


def _day(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")
