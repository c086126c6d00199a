"""Task config: the `[config]` schema of task.toml, and the values a release gives it.

Each parameter is declared with a type (int, float, bool, str), a default, an optional range
(`min`/`max`, numbers only) or a list of `choices`, and a help string:

    [config.sigma]
    type = "float"
    default = 0.2
    min = 0.0
    max = 1.0
    help = "keep outside samples the classifier scores at or above this"

A release resolves the schema into one value per parameter (its `--set KEY=VALUE` overrides, else the
default). The resolved config travels to devices as canonical JSON (`to_json`), signed with the bundle
digest, and the task reads it with `walle.config.get(key)`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import InvalidArgument

TYPES = ("int", "float", "bool", "str")
KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
PARAM_KEYS = ("type", "default", "min", "max", "choices", "help")
MAX_PARAMS = 64
MAX_CHOICES = 64
MAX_STR = 1024
MAX_HELP = 1024
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class ConfigError(InvalidArgument):
    """A [config] schema or a config value breaks a rule; the message names the parameter."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class ConfigParam:
    name: str
    type: str
    default: Any
    min: Any = None
    max: Any = None
    choices: tuple = ()
    help: str = ""

    def check(self, value: Any, where: str) -> Any:
        """`value` as this parameter's type, or ConfigError saying what is wrong with it."""
        t = self.type
        if t == "int" and _is_int(value):
            pass
        elif t == "float" and (_is_int(value) or isinstance(value, float)):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: {self.name} must be a finite number (got {value!r})")
            value = float(value)
        elif t == "bool" and isinstance(value, bool):
            pass
        elif t == "str" and isinstance(value, str):
            if len(value) > MAX_STR or "\x00" in value:
                raise ConfigError(f"{where}: {self.name} must be at most {MAX_STR} characters without NUL")
        else:
            raise ConfigError(f"{where}: {self.name} must be {_A[t]} (got {value!r})")
        if self.choices and value not in self.choices:
            raise ConfigError(f"{where}: {self.name} must be one of {', '.join(map(repr, self.choices))} "
                              f"(got {value!r})")
        if self.min is not None and value < self.min or self.max is not None and value > self.max:
            raise ConfigError(f"{where}: {self.name} must be in {self.range_text()} (got {value!r})")
        return value

    def parse(self, text: str, where: str) -> Any:
        """A value typed on a command line (`--set KEY=VALUE`), converted to this parameter's type."""
        t, s = self.type, text.strip()
        try:
            if t == "int":
                value: Any = int(s)
            elif t == "float":
                value = float(s)
            elif t == "bool":
                if s.lower() not in _TRUE + _FALSE:
                    raise ValueError
                value = s.lower() in _TRUE
            else:
                value = text
        except ValueError:
            raise ConfigError(f"{where}: {self.name} must be {_A[t]} (got {text!r})") from None
        return self.check(value, where)

    def range_text(self) -> str:
        lo = "-inf" if self.min is None else repr(self.min)
        hi = "+inf" if self.max is None else repr(self.max)
        return f"[{lo}, {hi}]"

    def describe(self) -> dict:
        """JSON-able description (what `task show --json` and docs print)."""
        d = {"type": self.type, "default": self.default, "help": self.help}
        if self.min is not None:
            d["min"] = self.min
        if self.max is not None:
            d["max"] = self.max
        if self.choices:
            d["choices"] = list(self.choices)
        return d


_A = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def parse_schema(raw: Any, src: str) -> tuple[ConfigParam, ...]:
    """The `[config]` table of task.toml as parameters, sorted by name; ConfigError names the problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: config must be a table of parameters ([config.NAME]) (got {raw!r})")
    if len(raw) > MAX_PARAMS:
        raise ConfigError(f"{src}: config declares {len(raw)} parameters; at most {MAX_PARAMS} are allowed")
    return tuple(_param(name, raw[name], src) for name in sorted(raw))


def _param(name: str, spec: Any, src: str) -> ConfigParam:
    at = f"{src}: config.{name}"
    if not KEY_RE.match(name):
        raise ConfigError(f"{at}: a parameter name is a letter or _, then up to 63 letters, digits or _")
    if not isinstance(spec, dict):
        raise ConfigError(f"{at} must be a table with type and default (got {spec!r})")
    for key in spec:
        if key not in PARAM_KEYS:
            raise ConfigError(f"{at}: unknown key {key!r} (allowed: {', '.join(PARAM_KEYS)})")
    t = spec.get("type")
    if t not in TYPES:
        raise ConfigError(f"{at}.type must be one of {', '.join(TYPES)} (got {t!r})")
    if "default" not in spec:
        raise ConfigError(f"{at}.default is required: the value a release gets unless it sets one")
    help_text = spec.get("help", "")
    if not isinstance(help_text, str) or len(help_text) > MAX_HELP:
        raise ConfigError(f"{at}.help must be a string of at most {MAX_HELP} characters")
    bounds = {}
    for key in ("min", "max"):
        if key in spec:
            if t not in ("int", "float"):
                raise ConfigError(f"{at}.{key} is only for int and float parameters")
            v = spec[key]
            ok = _is_int(v) if t == "int" else (_is_int(v) or isinstance(v, float)) and math.isfinite(v)
            if not ok:
                raise ConfigError(f"{at}.{key} must be {_A[t]} (got {v!r})")
            bounds[key] = v if t == "int" else float(v)
    if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
        raise ConfigError(f"{at}: min {bounds['min']!r} is above max {bounds['max']!r}")
    choices: tuple = ()
    if "choices" in spec:
        raw_choices = spec["choices"]
        if t == "bool" or not isinstance(raw_choices, list) or not 1 <= len(raw_choices) <= MAX_CHOICES:
            raise ConfigError(f"{at}.choices must be a list of 1 to {MAX_CHOICES} values of an int, float or str "
                              f"parameter")
        plain = ConfigParam(name, t, None)
        choices = tuple(plain.check(c, f"{at}.choices") for c in raw_choices)
        if len(set(choices)) != len(choices):
            raise ConfigError(f"{at}.choices lists a value twice")
    param = ConfigParam(name, t, None, bounds.get("min"), bounds.get("max"), choices, help_text)
    default = param.check(spec["default"], f"{at}.default")
    return ConfigParam(name, t, default, param.min, param.max, choices, help_text)


def resolve(schema: tuple[ConfigParam, ...], overrides: Mapping[str, Any] | None, where: str) -> dict:
    """One value per parameter: the override (text from `--set` is converted to the parameter's type,
    other values are checked as they are) or the default. Unknown keys are refused by name."""
    params = {p.name: p for p in schema}
    overrides = dict(overrides or {})
    for key in overrides:
        if key not in params:
            known = ", ".join(sorted(params)) or "none: the task declares no [config]"
            raise ConfigError(f"{where}: unknown config key {key!r} (declared: {known})")
    out = {}
    for name, p in params.items():
        if name in overrides:
            v = overrides[name]
            out[name] = p.parse(v, where) if isinstance(v, str) and p.type != "str" else p.check(v, where)
        else:
            out[name] = p.default
    return out


def parse_sets(items) -> dict[str, str]:
    """`["sigma=0.3", "K=5"]` (the repeated `--set` option) -> {"sigma": "0.3", "K": "5"}."""
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        if key in out:
            raise ConfigError(f"--set {key} is given twice")
        out[key] = value
    return out


def to_json(config: Mapping[str, Any]) -> str:
    """Canonical JSON of a resolved config ("" for none): the exact text a device receives and whose
    signature it checks, so the same config always gives the same bytes."""
    if not config:
        return ""
    return json.dumps(dict(config), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)

