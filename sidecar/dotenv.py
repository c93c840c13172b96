"""Secrets from a ``.env`` file in the working directory.

Only the key variables are read from it (:data:`DOTENV_VARIABLES`: the provider API
keys and ``SIDECAR_HTTP_TOKEN``); every other setting comes from the environment.
A variable set (non-empty) in the environment wins over the file. Lines are
``NAME=value``, optionally ``export NAME=value``, the value optionally in single or
double quotes; blank lines and ``#`` comments are skipped. Values are never logged
or echoed: a problem names the line number and the variable only.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.errors import ConfigError

DOTENV_VARIABLES = ("ALPHAVANTAGE_API_KEY", "TWELVEDATA_API_KEY", "POLYGON_API_KEY",
                    "SIDECAR_HTTP_TOKEN")
_LINE_RE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)\Z")


@dataclass(slots=True)
class DotEnv:
    """What :func:`load_dotenv` did: variables taken, kept from the environment, ignored."""

    path: Path
    #: Group or others may read the file (it holds keys: ``chmod 600`` it).
    open_to_others: bool = False
    loaded: list[str] = field(default_factory=list)
    overridden: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _value(raw: str) -> str:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    # Unquoted: a `#` after whitespace starts a comment.
    return re.split(r"\s+#", raw, maxsplit=1)[0].strip()


def load_dotenv(environ: MutableMapping[str, str], path: Path | None = None) -> DotEnv | None:
    """Put the key variables of ``path`` (default ``./.env``) into ``environ`` where it
    lacks them; ``None`` when there is no such file."""
    path = Path(".env") if path is None else path
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(".env", f"cannot read {path}: {type(exc).__name__}") from None
    result = DotEnv(path, open_to_others=bool(path.stat().st_mode & 0o077))
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _LINE_RE.match(stripped)
        if match is None:
            raise ConfigError(".env", f"line {number} is not NAME=value")
        name = match.group(1)
        if name not in DOTENV_VARIABLES:
            result.ignored.append(name)
        elif environ.get(name, "").strip():
            result.overridden.append(name)
        else:
            environ[name] = _value(match.group(2))
            result.loaded.append(name)
    return result
