"""Which environment variable names carry secrets, for the code that passes environments along.

``looks_secret(name)`` is the one rule the service (what it puts into a Ray job's runtime env, which the Ray
dashboard and ``JobSubmissionClient.get_job_info`` show to anyone who can reach them) and the training driver (what
it lets its workers inherit) apply: passwords, secret keys, tokens, credentials, API keys and database URLs (which
carry a password).
"""

from __future__ import annotations

import re

_SECRET = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|PRIVATE|(^|_)KEY($|_)|DATABASE_URL|(^|_)DSN$")


def looks_secret(name: str) -> bool:
    """True when the variable ``name`` (any case) would carry a secret: ``*PASSWORD*``, ``*SECRET*``, ``*TOKEN*``,
    ``*_KEY``/``*_KEY_*`` (``AWS_ACCESS_KEY_ID``, ``QWENVL_ADMIN_KEY``), ``*CREDENTIAL*``, ``*PRIVATE*``,
    ``*DATABASE_URL*`` and ``*_DSN`` (connection strings embed a password)."""
    return bool(_SECRET.search(name.upper()))
