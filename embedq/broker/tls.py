"""TLS options of a ``rediss://`` URL, for kombu, Celery's result backend and redis-py."""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qsl, urlparse

from embedq.errors import ConfigurationError

CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def tls_options(url: str) -> dict[str, Any] | None:
    """The TLS options a ``rediss://`` URL names in its query; certificates are verified
    unless it says ``ssl_cert_reqs=none``. None for a plain URL."""
    parsed = urlparse(url)
    if parsed.scheme != "rediss":
        return None
    query = dict(parse_qsl(parsed.query))
    wanted = query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if wanted not in CERT_REQS:
        raise ConfigurationError(f"ssl_cert_reqs={wanted!r}: use required, optional or none")
    return {"ssl_cert_reqs": CERT_REQS[wanted]} | {k: query[k] for k in TLS_FILES if k in query}


def connection_tls(url: str) -> dict[str, Any] | None:
    """What kombu's ``broker_use_ssl`` and Celery's ``redis_backend_use_ssl`` take for ``url``:
    :func:`tls_options` with the host name checked whenever certificates are. Both must get
    it: Celery's result backend refuses a ``rediss://`` URL without ``ssl_cert_reqs`` unless
    ``redis_backend_use_ssl`` supplies it. None for a plain URL."""
    options = tls_options(url)
    if options is None:
        return None
    return options | {"ssl_check_hostname": options["ssl_cert_reqs"] != ssl.CERT_NONE}
