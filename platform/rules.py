"""Release hit rules: a small expression language that selects devices, plus sticky percentage rollout.

A rule such as ``os == "android" and app_version satisfies "^2.3"`` is tokenized and parsed by hand
(recursive descent, never ``eval``) once, and compiled into nested Python closures, so evaluating it
against a device's attribute dict costs a few hundred nanoseconds. Grammar and semantics: docs/rules.md.
"""
from __future__ import annotations

import hashlib
import math
import operator
import re
from functools import lru_cache
from typing import Callable, Mapping, NamedTuple

from walle.platform.errors import InvalidArgument

__all__ = ["RuleError", "Rule", "Version", "compile_rule", "parse_version", "version_satisfies",
           "rollout_bucket", "in_rollout", "rollout_unit_id", "ATTRIBUTES", "VERSION_ATTRIBUTES",
           "MAX_RULE_LENGTH", "MAX_NESTING", "BUCKETS"]

VERSION_ATTRIBUTES = frozenset({"app_version", "os_version", "host_version"})
ATTRIBUTES = frozenset({"user_id", "device_id", "os", "device_model", "region", "network", "channel",
                        "tags"}) | VERSION_ATTRIBUTES
MAX_RULE_LENGTH = 4096
MAX_NESTING = 32
BUCKETS = 10_000

Matcher = Callable[[Mapping[str, object]], bool]


class RuleError(InvalidArgument):
    """A rule that does not compile. ``position`` is the 0-based offset of the problem in the source."""

    def __init__(self, message: str, position: int):
        super().__init__(message)
        self.position = position


# ---------------------------------------------------------------------------------------------- versions

class Version(NamedTuple):
    """An orderable version. Trailing zero components are dropped so "2.3" == "2.3.0"; ``pre`` is
    (1,) for a release and (0, *identifiers) for a pre-release, so plain tuple order is semver order."""

    release: tuple[int, ...]
    pre: tuple = (1,)

    def __str__(self) -> str:
        text = ".".join(map(str, self.release + (0,) * (3 - len(self.release))))
        if self.pre != _NO_PRE:
            text += "-" + ".".join(str(value) for _, value in self.pre[1:])
        return text


_NO_PRE = (1,)
_VERSION_RE = re.compile(r"[vV]?([0-9]+(?:\.[0-9]+){0,7})(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
                         r"(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?", re.ASCII)


def _make_version(release: tuple[int, ...], pre: str | None = None) -> Version:
    release = tuple(release)
    while release and release[-1] == 0:
        release = release[:-1]
    if pre is None:
        return Version(release, _NO_PRE)
    # Numeric identifiers sort numerically and before alphanumeric ones (semver 11.4).
    ids = tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split("."))
    return Version(release, (0,) + ids)


@lru_cache(maxsize=8192)  # devices share few distinct versions, so rules rarely re-parse one
def _parse_version_cached(text: str) -> Version | None:
    if len(text) > 128:
        return None
    m = _VERSION_RE.fullmatch(text.strip())
    if m is None:
        return None
    return _make_version(tuple(int(p) for p in m.group(1).split(".")), m.group(2))


def parse_version(text: str) -> Version | None:
    """Parse "2.3", "v2.10.0", "2.3.0-beta.1+build5" (up to 8 numeric components); None if not a version."""
    if not isinstance(text, str):
        return None
    return _parse_version_cached(text)


# ------------------------------------------------------------------------------ npm-style version ranges

_MIN_VERSION = _make_version((0,), "0")  # "0.0.0-0": nothing is lower
_PARTIAL_RE = re.compile(r"[vV]?(\d+|[xX*])(?:\.(\d+|[xX*])(?:\.(\d+|[xX*])"
                         r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+[0-9A-Za-z.-]+)?)?)?", re.ASCII)
_COMPARATOR_RE = re.compile(r"(<=|>=|<|>|=|~>|~|\^)?(.*)")
_HYPHEN_RE = re.compile(r"(\S+)\s+-\s+(\S+)")
_RANGE_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "=": operator.eq}
_NEVER = [("<", _MIN_VERSION)]
_COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
            ">=": operator.ge}


def _partial(text: str, whole: str) -> tuple[list[int | None], str | None]:
    """ "1.2.x" -> ([1, 2, None], None); a wildcard makes every later component a wildcard, as in npm."""
    m = _PARTIAL_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"'{text}' in version range '{whole}' is not a version or partial version")
    parts: list[int | None] = []
    for p in m.group(1, 2, 3):
        parts.append(None if p is None or p in "xX*" or (parts and parts[-1] is None) else int(p))
    return parts, (m.group(4) if parts[2] is not None else None)


def _upper_exclusive(parts: list[int | None], level: int) -> Version:
    """The first pre-release of the next version at ``level`` (0 major, 1 minor, 2 patch): "<2.0.0-0"."""
    bumped = [p or 0 for p in parts[:level]] + [(parts[level] or 0) + 1]
    return _make_version(tuple(bumped), "0")


def _desugar(op: str, parts: list[int | None], pre: str | None) -> list[tuple[str, Version]]:
    """One npm comparator ("^1.2", "~1.4.2", ">1.2", "1.x") as plain (op, Version) comparators."""
    wild = parts.index(None) if None in parts else 3  # how many leading components are given
    low = _make_version(tuple(p or 0 for p in parts), pre)
    if op in ("", "="):
        if wild == 3:
            return [("=", low)]
        return [] if wild == 0 else [(">=", low), ("<", _upper_exclusive(parts, wild - 1))]
    if op in ("~", "~>"):
        return [] if wild == 0 else [(">=", low), ("<", _upper_exclusive(parts, min(wild - 1, 1)))]
    if op == "^":
        if wild == 0:
            return []
        # Bump the first non-zero component given (or the last one given when all are zero).
        level = next((i for i in range(wild) if parts[i] != 0), wild - 1)
        return [(">=", low), ("<", _upper_exclusive(parts, level))]
    if wild == 3:
        return [(op, low)]
    if op == ">":
        return _NEVER if wild == 0 else [(">=", _make_version(tuple(_upper_exclusive(parts, wild - 1).release)))]
    if op == ">=":
        return [(">=", low)]
    if op == "<":
        return _NEVER if wild == 0 else [("<", _make_version(low.release, "0"))]
    return [] if wild == 0 else [("<", _upper_exclusive(parts, wild - 1))]  # "<="


@lru_cache(maxsize=1024)
def _compile_range(expr: str) -> Callable[[Version], bool]:
    """Compile "^2.3 || >=3.1.0 <4" into a predicate. Raises ValueError naming the bad piece."""
    if len(expr) > MAX_RULE_LENGTH:
        raise ValueError(f"version range is {len(expr)} characters; the limit is {MAX_RULE_LENGTH}")
    sets: list[list[tuple[str, Version]]] = []
    for alternative in expr.split("||"):
        alternative = alternative.strip()
        comparators: list[tuple[str, Version]] = []
        hyphen = _HYPHEN_RE.fullmatch(alternative)
        if hyphen:
            lo, lo_pre = _partial(hyphen.group(1), expr)
            hi, hi_pre = _partial(hyphen.group(2), expr)
            if lo[0] is not None:
                comparators.append((">=", _make_version(tuple(p or 0 for p in lo), lo_pre)))
            comparators += _desugar("<=", hi, hi_pre)
        else:
            alternative = re.sub(r"(<=|>=|<|>|=|~>|~|\^)\s+", r"\1", alternative)
            for token in alternative.split():
                op, rest = _COMPARATOR_RE.fullmatch(token).group(1, 2)
                parts, pre = _partial(rest, expr)
                comparators += _desugar(op or "", parts, pre)
        sets.append([(_RANGE_OPS[op], v) for op, v in comparators])

    def satisfied(version: Version) -> bool:
        for comparators in sets:
            if all(op(version, bound) for op, bound in comparators) and (
                    # npm: a pre-release only matches a set that names a pre-release of the same x.y.z.
                    version.pre == _NO_PRE
                    or any(b.pre != _NO_PRE and b.release == version.release for _, b in comparators)):
                return True
        return False
    return satisfied


def version_satisfies(version: str, range_expr: str) -> bool:
    """npm-style range test; False if ``version`` is not a version. A malformed range is InvalidArgument."""
    try:
        predicate = _compile_range(range_expr)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    parsed = parse_version(version)
    return parsed is not None and predicate(parsed)


# ------------------------------------------------------------------------------------------- tokenizer

class _Token(NamedTuple):
    kind: str  # STR NUM IDENT KW OP ( ) [ ] , END
    value: str
    pos: int
    end: int


_KEYWORDS = frozenset({"and", "or", "not", "in", "startswith", "satisfies", "true", "false"})
_TOKEN_RE = re.compile(r"\s*(?:(?P<NUM>[0-9]+(?:\.[0-9]+)*)|(?P<IDENT>[A-Za-z_][A-Za-z0-9_]*)"
                       r"|(?P<OP>==|!=|<=|>=|<|>)|(?P<PUNCT>[()\[\],])|(?P<QUOTE>[\"']))", re.ASCII)
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t"}
_HINTS = {"&": "use 'and'", "|": "use 'or'", "!": "use 'not' or '!='", "=": "use '==' to compare"}


def _syntax_error(problem: str, pos: int) -> RuleError:
    return RuleError(f"rule syntax error at column {pos + 1}: {problem}", pos)


def _tokenize(src: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(src)
    while True:
        m = _TOKEN_RE.match(src, i)
        if m is None or m.lastgroup is None:
            pos = i + len(src[i:]) - len(src[i:].lstrip())
            if pos >= n:
                tokens.append(_Token("END", "", n, n))
                return tokens
            char = src[pos]
            hint = _HINTS.get(char)
            raise _syntax_error(f"unexpected character {char!r}" + (f" ({hint})" if hint else ""), pos)
        kind, start = m.lastgroup, m.start(m.lastgroup)
        if kind == "QUOTE":
            quote, out, j = src[start], [], start + 1
            while j < n and src[j] != quote:
                if src[j] == "\\":
                    if j + 1 >= n or src[j + 1] not in _ESCAPES:
                        raise _syntax_error(f"unknown escape {src[j:j + 2]!r} in string", j)
                    out.append(_ESCAPES[src[j + 1]])
                    j += 2
                else:
                    out.append(src[j])
                    j += 1
            if j >= n:
                raise _syntax_error("string is not closed (missing " + quote + ")", start)
            tokens.append(_Token("STR", "".join(out), start, j + 1))
            i = j + 1
            continue
        value = m.group(kind)
        if kind == "IDENT" and value in _KEYWORDS:
            kind = "KW"
        elif kind == "PUNCT":
            kind = value
        tokens.append(_Token(kind, value, start, m.end()))
        i = m.end()


def _describe(tok: _Token) -> str:
    if tok.kind == "END":
        return "end of rule"
    if tok.kind == "STR":
        return f"string {tok.value!r}"
    return f"'{tok.value}'"


# ---------------------------------------------------------------------------------- clause compilation

def _as_text(value: object) -> str:
    """Attribute values are strings; numbers are accepted as their text, anything else counts as absent."""
    if value.__class__ is bool:
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        try:
            return str(value)
        except ValueError:  # an int too long to print (sys.set_int_max_str_digits)
            return ""
    return value if isinstance(value, str) else ""


def _tags_of(value: object) -> frozenset | list | tuple | set | None:
    if isinstance(value, str):  # "a,b" is accepted as a tag list
        return frozenset(t.strip() for t in value.split(",") if t.strip()) or None
    if isinstance(value, (list, tuple, set, frozenset)) and value:
        return value
    return None


def _text_clause(name: str, op: str, lit: object) -> Matcher:
    # One specialised closure per operator, with the lookup inlined: this is the hot path.
    if op == "==":
        def clause(a):
            v = a.get(name)
            if v.__class__ is not str:
                v = _as_text(v)
            return v == lit if v else False
    elif op == "!=":
        def clause(a):
            v = a.get(name)
            if v.__class__ is not str:
                v = _as_text(v)
            return v != lit if v else False
    elif op == "in":
        def clause(a):
            v = a.get(name)
            if v.__class__ is not str:
                v = _as_text(v)
            return v in lit if v else False
    elif op == "not in":
        def clause(a):
            v = a.get(name)
            if v.__class__ is not str:
                v = _as_text(v)
            return v not in lit if v else False
    elif op == "startswith":
        def clause(a):
            v = a.get(name)
            if v.__class__ is not str:
                v = _as_text(v)
            return v.startswith(lit) if v else False
    else:
        cmp = _COMPARE[op]  # lexicographic string order

        def clause(a):
            v = a.get(name)
            if v.__class__ is not str:
                v = _as_text(v)
            return cmp(v, lit) if v else False
    return clause


def _version_clause(name: str, op: str, lit: object) -> Matcher:
    # Ordering ops call the C comparison directly; membership and ranges go through one small test.
    if op in _COMPARE:
        cmp = _COMPARE[op]

        def clause(a):
            v = a.get(name)
            if v.__class__ is not str:
                v = _as_text(v)
            ver = _parse_version_cached(v) if v else None
            return cmp(ver, lit) if ver is not None else False
        return clause
    if op == "satisfies":
        test = lit
    elif op == "in":
        test = lit.__contains__
    else:  # "not in"
        def test(v): return v not in lit

    def clause(a):
        v = a.get(name)
        if v.__class__ is not str:
            v = _as_text(v)
        ver = _parse_version_cached(v) if v else None
        return test(ver) if ver is not None else False
    return clause


def _tag_clause(tag: str, negate: bool) -> Matcher:
    def clause(a):
        tags = a.get("tags")
        if tags.__class__ is not list:
            tags = _tags_of(tags)
        if not tags:
            return False
        return (tag not in tags) if negate else (tag in tags)
    return clause


def _all(parts: list[Matcher]) -> Matcher:
    if len(parts) == 2:
        x, y = parts
        return lambda a: x(a) and y(a)
    parts_t = tuple(parts)

    def conj(a):
        for p in parts_t:
            if not p(a):
                return False
        return True
    return conj


def _any(parts: list[Matcher]) -> Matcher:
    if len(parts) == 2:
        x, y = parts
        return lambda a: x(a) or y(a)
    parts_t = tuple(parts)

    def disj(a):
        for p in parts_t:
            if p(a):
                return True
        return False
    return disj


# ---------------------------------------------------------------------------------------------- parser

class _Leaf(NamedTuple):
    text: str
    attr: str | None
    fn: Matcher


class _Parser:
    def __init__(self, src: str):
        self.src = src
        self.tokens = _tokenize(src)
        self.i = 0
        self.depth = 0
        self.leaves: list[_Leaf] = []
        self.attrs: set[str] = set()

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def take(self) -> _Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def at_kw(self, word: str, ahead: int = 0) -> bool:
        tok = self.peek(ahead)
        return tok.kind == "KW" and tok.value == word

    def parse(self) -> Matcher:
        fn = self.or_expr()
        tok = self.peek()
        if tok.kind != "END":
            raise _syntax_error(f"expected 'and', 'or' or end of rule (got {_describe(tok)})", tok.pos)
        return fn

    def or_expr(self) -> Matcher:
        parts = [self.and_expr()]
        while self.at_kw("or"):
            self.take()
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else _any(parts)

    def and_expr(self) -> Matcher:
        parts = [self.not_expr()]
        while self.at_kw("and"):
            self.take()
            parts.append(self.not_expr())
        return parts[0] if len(parts) == 1 else _all(parts)

    def nest(self, tok: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise RuleError(f"rule error at column {tok.pos + 1}: nesting deeper than {MAX_NESTING} "
                            f"levels of '(' and 'not'", tok.pos)

    def not_expr(self) -> Matcher:
        if self.at_kw("not"):
            self.nest(self.take())
            inner = self.not_expr()
            self.depth -= 1
            return lambda a: not inner(a)
        return self.primary()

    def primary(self) -> Matcher:
        tok = self.peek()
        if tok.kind == "(":
            self.nest(self.take())
            inner = self.or_expr()
            close = self.peek()
            if close.kind != ")":
                raise _syntax_error(f"expected ')' to close the '(' at column {tok.pos + 1} "
                                    f"(got {_describe(close)})", close.pos)
            self.take()
            self.depth -= 1
            return inner
        if tok.kind in ("STR", "NUM") or (tok.kind == "KW" and tok.value in ("true", "false")):
            return self.literal_clause()
        if tok.kind == "IDENT":
            return self.attribute_clause()
        raise _syntax_error(f"expected an attribute name, a literal or '(' (got {_describe(tok)})", tok.pos)

    def literal(self, after: _Token) -> tuple[str, _Token]:
        tok = self.peek()
        if tok.kind in ("STR", "NUM") or (tok.kind == "KW" and tok.value in ("true", "false")):
            self.take()
            return tok.value, tok
        what = "a list is only allowed after 'in'" if tok.kind == "[" else f"got {_describe(tok)}"
        raise _syntax_error(f"expected a value after '{after.value}' ({what})", tok.pos)

    def list_literal(self, after: _Token) -> list[tuple[str, _Token]]:
        tok = self.peek()
        if tok.kind != "[":
            raise _syntax_error(f"expected a list like [\"a\", \"b\"] after '{after.value}' "
                                f"(got {_describe(tok)})", tok.pos)
        self.take()
        items: list[tuple[str, _Token]] = []
        last = tok  # the '[' or ',' a value must follow
        while self.peek().kind != "]":
            items.append(self.literal(last))
            sep = self.peek()
            if sep.kind == ",":
                last = self.take()
            elif sep.kind != "]":
                raise _syntax_error(f"expected ',' or ']' in list (got {_describe(sep)})", sep.pos)
        self.take()
        return items

    def take_operator(self) -> _Token | None:
        """The comparison/membership operator at the cursor ("not in" is merged into one token)."""
        tok = self.peek()
        if tok.kind == "OP" or (tok.kind == "KW" and tok.value in ("in", "startswith", "satisfies")):
            return self.take()
        if self.at_kw("not") and self.at_kw("in", 1):
            self.take()
            end = self.take().end
            return _Token("KW", "not in", tok.pos, end)
        return None

    def leaf(self, start: int, attr: str | None, fn: Matcher) -> Matcher:
        self.leaves.append(_Leaf(self.src[start:self.tokens[self.i - 1].end], attr, fn))
        return fn

    def literal_clause(self) -> Matcher:
        lit = self.take()
        op = self.take_operator()
        if op is None and lit.kind == "KW":  # bare true / false
            value = lit.value == "true"
            return self.leaf(lit.pos, None, lambda a: value)
        if op is None or op.value not in ("in", "not in"):
            got = _describe(op or self.peek())
            raise _syntax_error(f"expected 'in' or 'not in' after the literal {lit.value!r} "
                                f"(only tags membership may start with a literal; got {got})",
                                (op or self.peek()).pos)
        target = self.peek()
        if target.kind != "IDENT" or target.value != "tags":
            raise _syntax_error(f"expected 'tags' after '{op.value}' (got {_describe(target)})", target.pos)
        self.take()
        self.attrs.add("tags")
        return self.leaf(lit.pos, "tags", _tag_clause(lit.value, op.value == "not in"))

    def attribute_clause(self) -> Matcher:
        name_tok = self.take()
        name = name_tok.value
        if name not in ATTRIBUTES:
            raise RuleError(f"rule error at column {name_tok.pos + 1}: unknown attribute '{name}' "
                            f"(known: {', '.join(sorted(ATTRIBUTES))})", name_tok.pos)
        if name == "tags":
            raise RuleError(f"rule error at column {name_tok.pos + 1}: 'tags' is a list; test membership "
                            f"with \"x\" in tags or \"x\" not in tags", name_tok.pos)
        op = self.take_operator()
        if op is None:
            tok = self.peek()
            raise _syntax_error(f"expected an operator after '{name}' (==, !=, <, <=, >, >=, in, not in, "
                                f"startswith, satisfies; got {_describe(tok)})", tok.pos)
        self.attrs.add(name)
        is_version = name in VERSION_ATTRIBUTES
        if op.value == "satisfies":
            value, tok = self.literal(op)
            if not is_version:
                raise RuleError(f"rule error at column {op.pos + 1}: 'satisfies' only applies to version "
                                f"attributes ({', '.join(sorted(VERSION_ATTRIBUTES))}), not '{name}'", op.pos)
            try:
                lit: object = _compile_range(value)
            except ValueError as exc:
                raise RuleError(f"rule error at column {tok.pos + 1}: {exc}", tok.pos) from None
        elif op.value in ("in", "not in"):
            items = self.list_literal(op)
            lit = frozenset(self.version_literal(name, v, t) if is_version else v for v, t in items)
        elif op.value == "startswith":
            lit = self.literal(op)[0]  # a prefix test on the text, even for versions ("14.")
            is_version = False
        else:
            value, tok = self.literal(op)
            lit = self.version_literal(name, value, tok) if is_version else value
        make = _version_clause if is_version else _text_clause
        return self.leaf(name_tok.pos, name, make(name, op.value, lit))

    @staticmethod
    def version_literal(name: str, value: str, tok: _Token) -> Version:
        version = parse_version(value)
        if version is None:
            raise RuleError(f"rule error at column {tok.pos + 1}: {value!r} is not a valid version for "
                            f"'{name}' (expected e.g. \"2.3.0\" or \"2.3.0-beta.1\")", tok.pos)
        return version


# ------------------------------------------------------------------------------------------------ rules

class Rule:
    """A compiled rule. ``matches`` is a chain of closures; ``source`` is the text it came from."""

    __slots__ = ("source", "attributes", "_fn", "_leaves")

    def __init__(self, source: str, fn: Matcher, leaves: list[_Leaf], attributes: frozenset[str]):
        self.source = source
        self.attributes = attributes  # the attribute names the rule reads (for indexing rules by os etc.)
        self._fn = fn
        self._leaves = leaves

    def matches(self, attrs: Mapping[str, object]) -> bool:
        return self._fn(attrs)

    def explain(self, attrs: Mapping[str, object]) -> str:
        """Each clause's own truth value, with the device's value when a clause is false, then the result."""
        if not self._leaves:
            return "empty rule -> true"
        parts = []
        for leaf in self._leaves:
            ok = leaf.fn(attrs)
            text = f"{leaf.text} -> {'true' if ok else 'false'}"
            if not ok and leaf.attr:
                raw = attrs.get(leaf.attr)
                if leaf.attr == "tags":
                    tags = _tags_of(raw)
                    shown = "[" + ", ".join(sorted(map(str, tags))) + "]" if tags else None
                else:
                    shown = _as_text(raw) or None
                text += f" ({leaf.attr} absent)" if shown is None else f" ({leaf.attr}={shown})"
            parts.append(text)
        parts.append(f"result: {'true' if self.matches(attrs) else 'false'}")
        return "; ".join(parts)

    def __repr__(self) -> str:
        return f"Rule({self.source!r})"


def compile_rule(source: str) -> Rule:
    """Parse and compile a rule once. Raises RuleError (an InvalidArgument) naming the problem and column."""
    if not isinstance(source, str):
        raise RuleError(f"rule must be a string, not {type(source).__name__}", 0)
    if len(source) > MAX_RULE_LENGTH:
        raise RuleError(f"rule is {len(source)} characters long; the limit is {MAX_RULE_LENGTH}",
                        MAX_RULE_LENGTH)
    if not source.strip():
        return Rule(source, lambda a: True, [], frozenset())
    parser = _Parser(source)
    fn = parser.parse()
    return Rule(source, fn, parser.leaves, frozenset(parser.attrs))


# ---------------------------------------------------------------------------------------------- rollout

def rollout_bucket(task: str, salt: str, unit_id: str) -> int:
    """The unit's bucket in 0..9999 for this task and salt: sha256 of the length-prefixed parts, so it is
    the same in every process and on every platform (unlike hash()) and ("a:b", "c") != ("a", "b:c")."""
    if not unit_id:
        raise InvalidArgument("rollout unit_id is empty: pass the device's user_id or device_id")
    parts = [str(p).encode("utf-8") for p in (task, salt, unit_id)]
    key = b"".join(len(p).to_bytes(4, "big") + p for p in parts)
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % BUCKETS


def in_rollout(percent: float, task: str, salt: str, unit_id: str) -> bool:
    """True when the unit's bucket < percent*100. Raising the percent only adds buckets, so a unit that is
    in at 10% stays in at 50% (sticky); resolution is 0.01%."""
    if not isinstance(percent, (int, float)) or isinstance(percent, bool) or math.isnan(percent) \
            or not 0 <= percent <= 100:
        raise InvalidArgument(f"rollout percent must be a number from 0 to 100, got {percent!r}")
    # Rounding stops float noise (0.07*100 = 7.000000000000001) from adding a bucket.
    return rollout_bucket(task, salt, unit_id) < round(percent * 100, 6)


def rollout_unit_id(attrs: Mapping[str, object]) -> str | None:
    """The id a rollout is sticky to: user_id when present, else device_id, else None."""
    for key in ("user_id", "device_id"):
        value = _as_text(attrs.get(key))
        if value:
            return value
    return None
