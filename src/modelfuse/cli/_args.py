"""Argument parsing shared by the subcommands."""

from __future__ import annotations

from typing import Any


def key_values(pairs: list[str], flag: str, example: str) -> dict[str, Any]:
    """``["width=32", "upsample=true"]`` -> ``{"width": 32, "upsample": True}``: repeated
    ``FLAG KEY=VALUE`` options, values read as YAML; ``example`` shows a valid one in errors."""
    import yaml

    from modelfuse.errors import ConfigError

    options: dict[str, Any] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} {example}")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{flag} {item!r}: cannot read the value ({exc})") from None
    return options
