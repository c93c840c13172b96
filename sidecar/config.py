"""Where each setting comes from: a TOML file, the environment, and ``.env`` for secrets.

Precedence, lowest first: the built-in default, the configuration file
(``--config PATH`` or ``SIDECAR_CONFIG``), the environment. Secrets (API keys,
tokens, passwords) are never read from the file: only from the environment or a
``.env`` file in the working directory, which holds nothing else and which the
environment overrides.

The file spells a variable without its ``SIDECAR_`` prefix, in lower case, and a
table stands for the first word: ``timeframe = "5m"`` is ``SIDECAR_TIMEFRAME``,
``[redis] url = "..."`` is ``SIDECAR_REDIS_URL``. Lists become comma-separated
values (``symbols = ["AAPL", "EURUSD"]``).

:meth:`Configuration.apply` writes the file's and ``.env``'s values into the
process environment beneath the variables already set, so every settings reader
(:mod:`sidecar.settings`, :mod:`sidecar.provider_settings`, :mod:`sidecar.signals`)
and every child process sees one environment. A bad value in the file is reported
with the file and the key (:meth:`Configuration.locate`).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sidecar.errors import ConfigError
from sidecar.settings import INSTANCE, Definition, recording

PREFIX = "SIDECAR_"
#: The variable that names the configuration file (``--config`` wins over it).
CONFIG_VARIABLE = "SIDECAR_CONFIG"
DOTENV = ".env"
_SECRET_SUFFIXES = ("_API_KEY", "_TOKEN", "_PASSWORD", "_SECRET")
_DOTENV_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)\Z")

Origin = str  # "default", "file", "env" or ".env"


def is_secret(name: str) -> bool:
    """Whether the variable ``name`` holds a secret (read from the environment only)."""
    return name.endswith(_SECRET_SUFFIXES)


def file_key(name: str) -> str | None:
    """The configuration file's key of variable ``name`` (``None``: environment only)."""
    if is_secret(name) or not name.startswith(PREFIX):
        return None
    return name[len(PREFIX):].lower()


def is_pattern(name: str) -> bool:
    """Whether ``name`` is a pattern setting, one variable per instance (per exchange)."""
    return INSTANCE in name


def _pattern_re(name: str) -> re.Pattern[str]:
    head, _, tail = name.partition(INSTANCE)
    return re.compile(f"{re.escape(head)}([A-Z0-9][A-Z0-9_]*){re.escape(tail)}\\Z")


def setting_of(name: str, known: Iterable[str]) -> str | None:
    """The setting variable ``name`` is: itself, or the pattern it instantiates; ``None``
    when the readers know neither (``SIDECAR_CCXT_MARKETS_KRAKEN`` is
    ``SIDECAR_CCXT_MARKETS_<ID>``)."""
    known = set(known)
    if name in known:
        return name
    return next((p for p in sorted(known) if is_pattern(p) and _pattern_re(p).match(name)), None)


def _ccxt_settings(env: Mapping[str, str]) -> None:
    """The ccxt sources' settings: the per-exchange ones as patterns, and as read for
    every exchange ``env`` configures."""
    from sidecar.sources.ccxt_support import CcxtSettings, configured_exchanges

    for exchange_id in (INSTANCE.lower(), *configured_exchanges(env)):
        CcxtSettings.from_env(env, exchange_id)


def _readers() -> list[tuple[str, Callable[[Mapping[str, str]], object]]]:
    """Every settings reader, by the part of the daemon it configures."""
    from sidecar.provider_settings import ProviderSettings
    from sidecar.settings import Settings
    from sidecar.signals import SignalRules

    return [("daemon", Settings.from_env), ("providers", ProviderSettings.from_env),
            ("providers", _ccxt_settings), ("signals", SignalRules.from_env)]


def catalogue() -> dict[str, tuple[str, Definition]]:
    """Every setting the readers define, with its group, read from an empty environment."""
    out: dict[str, tuple[str, Definition]] = {}
    for group, read in _readers():
        with recording() as records:
            read({})
        for name, definition in records.items():
            out.setdefault(name, (group, definition))
    return out


def read_effective(env: Mapping[str, str]) -> dict[str, Definition]:
    """Every setting as the readers read it from ``env`` (bad values raise ConfigError)."""
    out: dict[str, Definition] = {}
    for _group, read in _readers():
        with recording() as records:
            read(env)
        for name, definition in records.items():
            out.setdefault(name, definition)
    return out


def _toml_text(value: Any) -> str | None:
    """A TOML value as the environment would spell it; ``None`` if it has no such form."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str | int | float) and not isinstance(v, bool)
                                       for v in value):
        return ",".join(str(v) for v in value)
    return None


def read_config_file(path: Path, known: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``variable -> (key, value text)`` of a configuration file; ConfigError naming the
    file and the key for a key that is unknown, a secret, given twice or of no usable type."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "no such configuration file") from None
    except IsADirectoryError:
        raise ConfigError(str(path), "a directory, not a configuration file") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    known = set(known)
    keys = {k for name in known if (k := file_key(name)) is not None}
    flat: list[tuple[str, str, Any]] = []  # (key as written, flat key, value)
    for top, value in data.items():
        if isinstance(value, dict):
            flat.extend((f"{top}.{sub}", f"{top}_{sub}", v) for sub, v in value.items())
        else:
            flat.append((top, top, value))
    out: dict[str, tuple[str, str]] = {}
    for written, key, value in flat:
        where = f"{path}: {written}"
        name = PREFIX + key.upper()
        if is_secret(name):
            raise ConfigError(where, "a secret is read from the environment (or .env), never from "
                                     "the configuration file")
        text = _toml_text(value)
        if text is None:
            raise ConfigError(where, f"expected a string, number, boolean or list, got "
                                     f"{type(value).__name__}")
        if key not in keys and setting_of(name, known) is None:
            near = difflib.get_close_matches(key.lower(), keys, n=1)
            raise ConfigError(where, "unknown setting" + (f" (did you mean {near[0]}?)" if near else ""))
        if name in out:
            raise ConfigError(where, f"set twice (also as {out[name][0]})")
        out[name] = (written, text)
    return out


def read_dotenv(path: Path, known: Iterable[str]) -> dict[str, str]:
    """The secrets of a ``.env`` file (``NAME=value`` lines, ``export`` and quotes allowed).

    Variables the daemon does not know are left alone (the file may serve other
    programs); a known variable that is not a secret belongs in the configuration
    file and is refused. Errors name the file and line, never a value.
    """
    known = set(known)
    out: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        match = _DOTENV_LINE.match(text)
        if match is None:
            raise ConfigError(f"{path}:{number}", "expected NAME=value")
        name, value = match.group(1), match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        if setting_of(name, known) is None:
            continue
        if not is_secret(name):
            raise ConfigError(f"{path}:{number}", f"{name} is not a secret: set it in the "
                                                  "configuration file or the environment")
        out[name] = value
    return out


@dataclass(frozen=True, slots=True)
class Configuration:
    """The layers beneath the environment and what each one set."""

    file: Path | None = None
    #: ``variable -> (key, value text)`` from the configuration file.
    file_values: dict[str, tuple[str, str]] = field(default_factory=dict)
    dotenv: Path | None = None
    dotenv_values: dict[str, str] = field(default_factory=dict, repr=False)
    #: Group or others may read the ``.env`` file (it holds secrets: ``chmod 600`` it).
    dotenv_open_to_others: bool = False
    #: The variables set (not blank) in the environment before :meth:`apply`.
    from_env: frozenset[str] = frozenset()

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None, env: Mapping[str, str],
             cwd: Path | None = None) -> Configuration:
        """Read the file (``path``, else ``SIDECAR_CONFIG``) and ``cwd``'s ``.env``."""
        known = catalogue()
        given = path if path is not None else (env.get(CONFIG_VARIABLE) or "").strip() or None
        file = Path(given).expanduser() if given is not None else None
        file_values = read_config_file(file, known) if file is not None else {}
        dotenv = (cwd or Path.cwd()) / DOTENV
        found = dotenv.is_file()
        dotenv_values = read_dotenv(dotenv, known) if found else {}
        return cls(file=file, file_values=file_values,
                   dotenv=dotenv if found else None, dotenv_values=dotenv_values,
                   dotenv_open_to_others=found and bool(dotenv.stat().st_mode & 0o077),
                   from_env=frozenset(k for k, v in env.items() if v.strip()))

    def apply(self, environ: MutableMapping[str, str]) -> None:
        """Fill the file's and ``.env``'s values in where ``environ`` has none (env wins)."""
        for name, value in self.dotenv_values.items():
            if name not in self.from_env:
                environ[name] = value
        for name, (_key, value) in self.file_values.items():
            if name not in self.from_env:
                environ[name] = value

    def dotenv_report(self) -> dict[str, object] | None:
        """What ``.env`` gave, by name only (the values are secrets); ``None`` without one."""
        if self.dotenv is None:
            return None
        return {"path": str(self.dotenv.resolve()),
                "loaded": sorted(n for n in self.dotenv_values if n not in self.from_env),
                "environment_wins": sorted(n for n in self.dotenv_values if n in self.from_env),
                "open_to_others": self.dotenv_open_to_others}

    def origin(self, name: str) -> Origin:
        """Where the value of ``name`` comes from: ``env``, ``.env``, ``file`` or ``default``."""
        if name in self.from_env:
            return "env"
        if name in self.dotenv_values:
            return ".env"
        if name in self.file_values:
            return "file"
        return "default"

    def locate(self, setting: str) -> str:
        """How an error names ``setting``: the variable, or the file and key it came from."""
        if self.origin(setting) == "file":
            return f"{self.file}: {self.file_values[setting][0]} ({setting})"
        return setting


# -- sidecar config ------------------------------------------------------------------


def mask(name: str, value: object) -> str:
    """A value for display: secrets as ``***``, a URL's password as ``***``."""
    text = show(value)
    if value is None or text == "":
        return text
    if is_secret(name):
        return "***"
    if "://" in text:
        password = urlsplit(text).password
        if password:
            return text.replace(f":{password}@", ":***@")
    return text


def show(value: object) -> str:
    """A setting's value as the environment would spell it (``-``: unset)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list | frozenset | set):
        return ",".join(str(v) for v in value)
    return str(value)


def effective_rows(config: Configuration, env: Mapping[str, str]) -> list[dict[str, str]]:
    """One row per setting: variable, file key, value (masked) and where it came from."""
    from sidecar.config_reference import DOCS

    rows = []
    for name, definition in read_effective(env).items():
        value = definition.value
        doc = DOCS.get(setting_of(name, DOCS) or name)
        if value is None and definition.kind == "text" and not is_secret(name) and doc is not None:
            value = doc.default.replace("`", "") or None
        origin = config.origin(name)
        if origin == "file":
            origin = f"file ({config.file_values[name][0]})"
        rows.append({"variable": name, "key": file_key(name) or "", "value": mask(name, value),
                     "from": origin})
    return rows
