"""Credentials in URLs: find them by parsing, hide them in anything shown, and hand http(s)
credentials to MLflow through its own environment variables.

Every form the libraries accept is covered:
- userinfo: `scheme://user:password@host`, and for http(s) a token as the user part
  (`https://TOKEN@host`), so an http user part is hidden too;
- sensitive query keys: `?password=...` (a valid libpq form), `sslpassword`, `token`, `secret`,
  `api_key`, signed-URL keys (`X-Amz-Signature`, `sig`, ...);
- libpq keyword/value strings (`host=h password=...`) and the values of the credential
  environment variables (MLFLOW_TRACKING_PASSWORD / _TOKEN, PGPASSWORD, ...) wherever they
  appear in a text.
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote, unquote, urlsplit, urlunsplit

MASK = "***"
# Query keys whose value is a secret: exact names, and names containing one of the fragments.
_SECRET_KEYS = {"pwd", "pass", "sig", "key", "auth", "code"}
_SECRET_FRAGMENTS = ("password", "passwd", "secret", "token", "credential", "apikey", "api_key",
                     "access_key", "private", "session", "signature")
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PGPASSWORD",
              "DATABRICKS_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
HTTP_SCHEMES = ("http", "https")

# scheme://... up to whitespace or a quote (the usual ends of a URL inside a message)
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>`]*")
# key=value outside URLs: libpq connection strings, logged settings
_KEY_VALUE = re.compile(r"(?i)\b(password|passwd|pwd|sslpassword|token|secret|api_key|apikey)"
                        r"(\s*[=:]\s*)('[^']*'|\"[^\"]*\"|[^\s&;,'\"]+)")


def is_secret_key(key: str) -> bool:
    low = key.lower()
    return low in _SECRET_KEYS or any(fragment in low for fragment in _SECRET_FRAGMENTS)


def _split_authority(url: str) -> tuple[str, str, str] | None:
    """(scheme://, userinfo, rest) when the URL has a userinfo part, else None.

    The userinfo ends at the last '@' before the query: a password with an unescaped '/', '?'
    or '@' is still hidden whole (over-hiding a path is the safe side)."""
    head, sep, tail = url.partition("://")
    if not sep or tail.startswith("/"):
        return None
    end = len(tail)
    for stop in ("?", "#"):
        index = tail.find(stop)
        if index != -1:
            end = min(end, index)
    at = tail.rfind("@", 0, end)
    if at == -1:
        return None
    return head + "://", tail[:at], tail[at:]


def redact_url(url: str) -> str:
    """One URL with its secrets masked; the rest kept as written."""
    scheme = url.split("://", 1)[0].split("+")[0].lower()
    parts = _split_authority(url)
    if parts is not None:
        head, userinfo, rest = parts
        user, colon, _ = userinfo.partition(":")
        if scheme in HTTP_SCHEMES and not colon:
            userinfo = MASK  # https://TOKEN@host: the user part is the secret
        elif colon:
            userinfo = f"{user}:{MASK}"
        url = head + userinfo + rest
    if "?" in url:
        base, _, query = url.partition("?")
        query, hash_mark, fragment = query.partition("#")
        pairs = []
        for pair in query.split("&"):
            key, eq, value = pair.partition("=")
            pairs.append(f"{key}={MASK}" if eq and value and is_secret_key(unquote(key)) else pair)
        url = f"{base}?{'&'.join(pairs)}{hash_mark}{fragment}"
    return url


def redact(text: object) -> str:
    """`text` with every credential hidden: in URLs, in key=value pairs, and any literal
    value of a credential environment variable."""
    out = _URL.sub(lambda m: redact_url(m.group(0)), str(text))
    out = _KEY_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", out)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            out = out.replace(value, MASK)
    return out


def has_credentials(url: str) -> bool:
    return redact_url(url) != url


def move_http_credentials(uri: str) -> str:
    """An http(s) tracking URI with `user:password@` (or `TOKEN@`) -> the URI without them, the
    credentials put where MLflow reads them (MLFLOW_TRACKING_USERNAME / _PASSWORD, or
    MLFLOW_TRACKING_TOKEN). Variables already set win. Other URIs are returned unchanged."""
    parts = urlsplit(uri)
    if parts.scheme.lower() not in HTTP_SCHEMES or "@" not in parts.netloc:
        return uri
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if colon:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(user))
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(password))
    elif user:
        os.environ.setdefault("MLFLOW_TRACKING_TOKEN", unquote(user))
    return urlunsplit(parts._replace(netloc=hostport))


def http_auth_header() -> dict[str, str]:
    """The Authorization header MLflow would send, from its environment variables."""
    import base64

    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password is not None:
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {basic}"}
    return {}


def quote_userinfo(user: str, password: str) -> str:
    """user:password escaped for a URL (tests and docs build URLs with it)."""
    return f"{quote(user, safe='')}:{quote(password, safe='')}"


def install_redaction() -> None:
    """Hide credentials in every log record (MLflow's, Optuna's, SQLAlchemy's) and in the
    traceback of an unexpected crash, for the rest of the process."""
    import logging
    import sys

    previous = logging.getLogRecordFactory()
    if getattr(previous, "fractal_redacts", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            record.msg = redact(record.getMessage())
            record.args = None
        except Exception:  # noqa: BLE001 - a malformed record is logging's to report
            pass
        return record

    factory.fractal_redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)

    def excepthook(kind, value, tb) -> None:
        import traceback

        text = "".join(traceback.format_exception(kind, value, tb))
        sys.stderr.write(redact(text))

    sys.excepthook = excepthook
