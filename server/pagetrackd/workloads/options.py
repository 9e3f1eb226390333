"""Workload options: typed specs, and parsing what the API sends (strings) into them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pagetrackd.domain import InvalidArgument


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """One workload option: its kind ("int", "float", "bool"), default and bounds."""

    kind: str
    default: int | float | bool
    lo: float = 0
    hi: float = 1 << 62


def parse_options(
    kind: str, specs: Mapping[str, OptionSpec], options: Mapping[str, Any]
) -> dict[str, Any]:
    """Options as typed values (strings from the API are parsed); unknown keys, bad
    values and out-of-range numbers raise InvalidArgument naming the option."""
    unknown = sorted(set(options) - set(specs))
    if unknown:
        raise InvalidArgument(
            f"{kind}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(specs))}"
        )
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        raw = options.get(name, spec.default)
        value: int | float | bool
        try:
            if spec.kind == "bool":
                if isinstance(raw, str):
                    if raw.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                        raise ValueError(raw)
                    value = raw.lower() in ("true", "1", "yes", "on")
                elif isinstance(raw, bool | int):
                    value = bool(raw)
                else:
                    raise ValueError(raw)
            elif spec.kind == "int":
                if isinstance(raw, bool):
                    raise ValueError(raw)
                value = int(raw, 0) if isinstance(raw, str) else int(raw)
                if isinstance(raw, float) and raw != value:
                    raise ValueError(raw)
            else:
                if isinstance(raw, bool):
                    raise ValueError(raw)
                value = float(raw)
        except (TypeError, ValueError):
            raise InvalidArgument(
                f"{kind}: option {name!r} must be {spec.kind}, got {raw!r}"
            ) from None
        if spec.kind != "bool" and not spec.lo <= value <= spec.hi:
            raise InvalidArgument(
                f"{kind}: option {name!r} must be between {spec.lo:g} and {spec.hi:g},"
                f" got {value}"
            )
        out[name] = value
    return out


#: options every guest-OS workload takes
