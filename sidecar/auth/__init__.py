"""Client authentication on the GOPROXY port (``client_auth:``, off by default).

    htpasswd.py     bcrypt htpasswd files (weak formats refused)
    tokens.py       bearer tokens, stored as SHA-256
    credentials.py  clients' and admins' credentials, loaded together
    networks.py     trusted client networks
    access.py       identities and groups -> module globs
    throttle.py     failures per client address, bounded
    credcache.py    verified credentials for a short TTL, bounded
    gate.py         the front door every request passes
    reloader.py     the files reloaded on change; ``open_door`` builds both
    explain.py      what `check` and `check --auth USER --route MODULE` print

The upstreams' own credentials (``upstreams[].auth``) are another matter: a
client's ``Authorization`` header is never forwarded upstream.

The section itself (``ClientAuthConfig``) is declared in ``sidecar.config``
with every other key.
"""
