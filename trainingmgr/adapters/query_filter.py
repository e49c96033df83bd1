"""A small, safe filter language for a feature group's `query_filter`.

The text is tokenised and parsed by hand into a tree of comparisons; the tree is then applied to a pandas
DataFrame with vectorised operations. Nothing is ever passed to eval, DataFrame.query or an SQL engine, so a filter
can only compare columns with constants.

Grammar (keywords are case-insensitive; whitespace is free)::

    filter     := <empty> | or_expr
    or_expr    := and_expr ( OR and_expr )*
    and_expr   := not_expr ( AND not_expr )*
    not_expr   := NOT not_expr | '(' or_expr ')' | test
    test       := column op literal
                | literal op column                      -- 5 < x means x > 5
                | column [NOT] IN '(' literal ( ',' literal )* [','] ')'
                | column IS [NOT] NULL
    op         := '==' | '=' | '!=' | '<>' | '<' | '<=' | '>' | '>='
    column     := name                                   -- [A-Za-z_][A-Za-z0-9_]*, not a keyword
                | `any text but a backtick`              -- for names with spaces, dots or keywords
    literal    := 'text' | "text"                        -- \\ \' \" \n \t escapes; '' inside '...' is a quote
                | [+|-] number                           -- 12, -3.5, 1e6, .5
                | TRUE | FALSE
                | NULL | NONE                            -- only with ==, =, != and <> (same as IS [NOT] NULL)

`&&`, `||` and `!` are not part of the language: write AND, OR, NOT. Column names are matched exactly (case
matters) against the columns of the source; names starting with `__` are refused.

Meaning: a comparison is true only where the column has a value (a missing value never equals, differs from or
orders against anything; test for it with IS NULL). NOT, AND and OR are plain boolean operations on the result.
A number column is compared with numbers, a text column with text, a boolean column with TRUE/FALSE; a date-time
column may be compared with text such as '2024-01-31 12:00'. Mixing kinds is an error rather than an empty
result, so a typo like `cellid = 1` against text ids is reported.

Refused: function calls, attribute access, subscripts, arithmetic, lambdas, several statements (`;`), comments,
dunder names, filters longer than MAX_FILTER_LENGTH characters or nested deeper than MAX_DEPTH.
"""
from __future__ import annotations

import difflib
import operator
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection, Union

if TYPE_CHECKING:
    import pandas as pd

# pandas is imported where a filter is applied, not here: the API checks a filter's syntax when a job is created
# (parse_filter), and a web process has no other use for pandas.

MAX_FILTER_LENGTH = 4096
MAX_DEPTH = 32  # parentheses and NOTs inside each other: bounds the parser's recursion


class FilterError(ValueError):
    """The filter cannot be used: bad syntax, an unknown column, a refused construct or a type mismatch."""


Literal = Union[str, int, float, bool, None]


# ----------------------------------------------------------------------------------------------- the tree
@dataclass(frozen=True)
class Compare:
    column: str
    op: str  # one of _COMPARE_OPS' keys (== normalised: "=" and "<>" never appear here)
    value: Literal


@dataclass(frozen=True)
class InList:
    column: str
    values: tuple[Literal, ...]
    negate: bool


@dataclass(frozen=True)
class IsNull:
    column: str
    negate: bool


@dataclass(frozen=True)
class Not:
    item: "Node"


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" | "or"
    items: tuple["Node", ...]


Node = Union[Compare, InList, IsNull, Not, BoolOp]

_COMPARE_OPS: dict[str, Callable[[object, object], object]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
# What `5 < x` becomes once the column is put on the left.
_MIRRORED = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_KEYWORDS = {"and", "or", "not", "in", "is", "true", "false", "null", "none"}


# ----------------------------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class _Token:
    kind: str  # NAME | COLUMN (back-quoted) | KEYWORD | STRING | NUMBER | OP | SIGN | REFUSED | END
    value: object
    pos: int  # 1-based character position, for messages


_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = ("==", "!=", "<>", "<=", ">=", "<", ">", "=", "(", ")", ",")
# Characters that only appear in constructs we refuse: say which construct, not just "unexpected".
_REFUSED_CHARS = {
    ".": "attribute access is not allowed",
    "[": "subscripts are not allowed",
    "]": "subscripts are not allowed",
    "*": "arithmetic is not allowed",
    "/": "arithmetic is not allowed",
    "%": "arithmetic is not allowed",
    "^": "arithmetic is not allowed",
    ";": "only one expression is allowed (';' found)",
    ":": "':' is not allowed (no lambdas, slices or dictionaries)",
    "{": "'{' is not allowed",
    "}": "'}' is not allowed",
    "@": "'@' is not allowed (no variables)",
    "&": "use AND instead of '&'",
    "|": "use OR instead of '|'",
    "~": "use NOT instead of '~'",
    "!": "use NOT or != instead of '!'",
    "#": "comments are not allowed",
}
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t"}


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
            continue
        pos = i + 1
        if ch in "'\"":
            value, i = _read_string(text, i)
            tokens.append(_Token("STRING", value, pos))
            continue
        if ch == "`":
            end = text.find("`", i + 1)
            if end < 0:
                raise FilterError(f"unterminated `column name` starting at position {pos}")
            name = text[i + 1 : end]
            if not name or "\n" in name:
                raise FilterError(f"empty or multi-line `column name` at position {pos}")
            tokens.append(_Token("COLUMN", name, pos))
            i = end + 1
            continue
        if text.startswith("--", i):
            tokens.append(_Token("REFUSED", f"comments are not allowed (position {pos})", pos))
            i += 2
            continue
        number = _NUMBER.match(text, i)
        if number:
            raw = number.group()
            i = number.end()
            if i < n and (text[i].isalnum() or text[i] in "_."):
                raise FilterError(f"malformed number {text[pos - 1 : i + 1]!r} at position {pos}")
            value: int | float = float(raw) if any(c in raw for c in ".eE") else int(raw)
            tokens.append(_Token("NUMBER", value, pos))
            continue
        name_match = _NAME.match(text, i)
        if name_match:
            word = name_match.group()
            i = name_match.end()
            lowered = word.lower()
            if lowered in _KEYWORDS:
                tokens.append(_Token("KEYWORD", lowered, pos))
            else:
                tokens.append(_Token("NAME", word, pos))
            continue
        if ch in "+-":
            # Only valid as the sign of a number literal; the parser says "arithmetic" anywhere else.
            tokens.append(_Token("SIGN", ch, pos))
            i += 1
            continue
        for op in _OPERATORS:
            if text.startswith(op, i):
                tokens.append(_Token("OP", op, pos))
                i += len(op)
                break
        else:
            # Reported when the parser reaches it, so the first problem in reading order is the one named.
            if ch in _REFUSED_CHARS:
                tokens.append(_Token("REFUSED", f"{_REFUSED_CHARS[ch]} (position {pos})", pos))
            else:
                tokens.append(_Token("REFUSED", f"unexpected character {ch!r} at position {pos}", pos))
            i += 1
    tokens.append(_Token("END", None, n + 1))
    return tokens


def _read_string(text: str, start: int) -> tuple[str, int]:
    quote = text[start]
    out: list[str] = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            if i + 1 >= len(text):
                break
            escaped = text[i + 1]
            if escaped not in _ESCAPES:
                raise FilterError(f"unknown escape '\\{escaped}' at position {i + 1}")
            out.append(_ESCAPES[escaped])
            i += 2
            continue
        if ch == quote:
            if text.startswith(quote * 2, i):  # SQL's way of writing a quote inside a string
                out.append(quote)
                i += 2
                continue
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    raise FilterError(f"unterminated string starting at position {start + 1}")


# ----------------------------------------------------------------------------------------------- parser
class _Parser:
    """Recursive descent over the token list; depth is bounded by MAX_DEPTH."""

    def __init__(self, tokens: list[_Token]):
        self.tokens = tokens
        self.i = 0
        self.depth = 0
        self.columns: list[str] = []  # every column the filter names, in order of appearance

    # -- helpers
    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def _take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def _is(self, kind: str, value: object = None) -> bool:
        return self.tok.kind == kind and (value is None or self.tok.value == value)

    def _describe(self, token: _Token) -> str:
        if token.kind == "END":
            return "the end of the filter"
        return f"{token.value!r} at position {token.pos}"

    def _fail(self, expected: str) -> FilterError:
        token = self.tok
        if token.kind == "SIGN":
            return FilterError(f"arithmetic is not allowed (position {token.pos})")
        if token.kind == "REFUSED":
            return FilterError(str(token.value))
        return FilterError(f"expected {expected}, found {self._describe(token)}")

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FilterError(f"the filter is nested more than {MAX_DEPTH} levels deep")

    # -- grammar
    def parse(self) -> Node:
        node = self._or()
        if not self._is("END"):
            raise self._fail("AND, OR or the end of the filter")
        return node

    def _or(self) -> Node:
        items = [self._and()]
        while self._is("KEYWORD", "or"):
            self._take()
            items.append(self._and())
        return items[0] if len(items) == 1 else BoolOp("or", tuple(items))

    def _and(self) -> Node:
        items = [self._not()]
        while self._is("KEYWORD", "and"):
            self._take()
            items.append(self._not())
        return items[0] if len(items) == 1 else BoolOp("and", tuple(items))

    def _not(self) -> Node:
        if self._is("KEYWORD", "not"):
            self._take()
            self._enter()
            node: Node = Not(self._not())
            self.depth -= 1
            return node
        if self._is("OP", "("):
            self._take()
            self._enter()
            node = self._or()
            self.depth -= 1
            if not self._is("OP", ")"):
                raise self._fail("')'")
            self._take()
            return node
        return self._test()

    def _test(self) -> Node:
        if self._is("NAME") or self._is("COLUMN"):
            column = self._column()
            if self._is("KEYWORD", "in") or self._is("KEYWORD", "not"):
                return self._in_list(column)
            if self._is("KEYWORD", "is"):
                self._take()
                negate = False
                if self._is("KEYWORD", "not"):
                    self._take()
                    negate = True
                if not self._is("KEYWORD", "null"):
                    raise self._fail("NULL after IS / IS NOT")
                self._take()
                return IsNull(column, negate)
            op = self._operator()
            return self._comparison(column, op, self._literal())
        if self._is("STRING") or self._is("NUMBER") or self._is("SIGN") or self._is("KEYWORD"):
            if self._is("KEYWORD") and self.tok.value not in ("true", "false", "null", "none"):
                raise self._fail("a comparison")
            value = self._literal()
            op = self._operator()
            if not (self._is("NAME") or self._is("COLUMN")):
                raise self._fail("a column name (comparisons are between a column and a constant)")
            return self._comparison(self._column(), _MIRRORED[op], value)
        raise self._fail("a comparison")

    def _column(self) -> str:
        token = self._take()
        name = str(token.value)
        if token.kind == "NAME":
            if name == "lambda":
                raise FilterError(f"lambdas are not allowed (position {token.pos})")
            if self._is("OP", "("):
                raise FilterError(f"function calls are not allowed: {name}(...) at position {token.pos}")
        if name.startswith("__"):
            raise FilterError(f"names starting with '__' are not allowed: {name!r} at position {token.pos}")
        self.columns.append(name)
        return name

    def _operator(self) -> str:
        if not self._is("OP") or self.tok.value not in ("==", "=", "!=", "<>", "<", "<=", ">", ">="):
            raise self._fail("a comparison operator (==, !=, <, <=, >, >=, IN, IS)")
        op = str(self._take().value)
        return {"=": "==", "<>": "!="}.get(op, op)

    def _literal(self) -> Literal:
        token = self.tok
        if token.kind == "SIGN":
            self._take()
            if not self._is("NUMBER"):
                raise FilterError(f"arithmetic is not allowed (position {token.pos})")
            number = self._take().value
            assert isinstance(number, (int, float))
            return -number if token.value == "-" else number
        if token.kind in ("STRING", "NUMBER"):
            self._take()
            return token.value  # type: ignore[return-value]
        if token.kind == "KEYWORD" and token.value in ("true", "false"):
            self._take()
            return token.value == "true"
        if token.kind == "KEYWORD" and token.value in ("null", "none"):
            self._take()
            return None
        if token.kind in ("NAME", "COLUMN"):
            raise FilterError(
                f"comparing two columns is not allowed ({token.value!r} at position {token.pos}): "
                "compare a column with a constant"
            )
        raise self._fail("a constant (text in quotes, a number, TRUE, FALSE or NULL)")

    def _comparison(self, column: str, op: str, value: Literal) -> Node:
        if self._is("OP") and self.tok.value in ("==", "=", "!=", "<>", "<", "<=", ">", ">="):
            raise FilterError(f"chained comparisons are not allowed (position {self.tok.pos}); use AND")
        if value is None:
            if op not in ("==", "!="):
                raise FilterError(f"NULL can only be tested with =, == or != (or IS [NOT] NULL), not {op}")
            return IsNull(column, negate=(op == "!="))
        return Compare(column, op, value)

    def _in_list(self, column: str) -> Node:
        negate = False
        if self._is("KEYWORD", "not"):
            self._take()
            negate = True
            if not self._is("KEYWORD", "in"):
                raise self._fail("IN after NOT")
        self._take()  # IN
        if not self._is("OP", "("):
            raise self._fail("'(' after IN")
        self._take()
        values: list[Literal] = []
        while True:
            if self._is("OP", ")") and values:  # a trailing comma is fine
                break
            value = self._literal()
            if value is None:
                raise FilterError("NULL is not allowed in an IN list; use IS NULL")
            values.append(value)
            if self._is("OP", ","):
                self._take()
                continue
            if not self._is("OP", ")"):
                raise self._fail("',' or ')' in the IN list")
            break
        self._take()  # ")"
        return InList(column, tuple(values), negate)


# ----------------------------------------------------------------------------------------------- evaluation
def _series_kind(series: pd.Series) -> str:
    import pandas as pd
    from pandas.api import types as ptypes

    dtype = series.dtype
    if ptypes.is_bool_dtype(dtype):
        return "bool"
    if ptypes.is_numeric_dtype(dtype):
        return "number"
    if ptypes.is_datetime64_any_dtype(dtype):
        return "datetime"
    if isinstance(dtype, pd.StringDtype):
        return "text"
    return "other"  # object columns of mixed values: let pandas try, and report what it refuses


def _literal_kind(value: Literal) -> str:
    if isinstance(value, bool):  # before int: bool is an int in Python
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "text"


_ACCEPTS = {"number": {"number"}, "bool": {"bool"}, "text": {"text"}, "datetime": {"text"}}
_KIND_WORDS = {"number": "numbers", "bool": "TRUE/FALSE values", "text": "text", "datetime": "date-times"}


def _check_kind(series: pd.Series, column: str, value: Literal) -> None:
    kind = _series_kind(series)
    accepted = _ACCEPTS.get(kind)
    if accepted is not None and _literal_kind(value) not in accepted:
        wanted = "text such as '2024-01-31'" if kind == "datetime" else _KIND_WORDS[kind]
        raise FilterError(f"column {column!r} holds {_KIND_WORDS[kind]}: compare it with {wanted}, not {value!r}")


def _as_mask(result: object, index: pd.Index) -> pd.Series:
    import pandas as pd

    series = result if isinstance(result, pd.Series) else pd.Series(result, index=index)
    return series.fillna(False).astype(bool)


def _evaluate(node: Node, frame: pd.DataFrame) -> pd.Series:
    if isinstance(node, Compare):
        series = frame[node.column]
        _check_kind(series, node.column, node.value)
        try:
            result = _COMPARE_OPS[node.op](series, node.value)
        except (TypeError, ValueError) as e:
            raise FilterError(
                f"cannot compare column {node.column!r} ({series.dtype}) with {node.value!r}: {e}"
            ) from None
        # SQL's rule, also for !=: a missing value satisfies no comparison.
        return _as_mask(result, frame.index) & series.notna()
    if isinstance(node, InList):
        series = frame[node.column]
        for value in node.values:
            _check_kind(series, node.column, value)
        found = _as_mask(series.isin(list(node.values)), frame.index)
        return (~found & series.notna()) if node.negate else found
    if isinstance(node, IsNull):
        missing = frame[node.column].isna()
        return ~missing if node.negate else missing
    if isinstance(node, Not):
        return ~_evaluate(node.item, frame)
    masks = [_evaluate(item, frame) for item in node.items]
    combined = masks[0]
    for mask in masks[1:]:
        combined = (combined & mask) if node.op == "and" else (combined | mask)
    return combined


class CompiledFilter:
    """A parsed filter: call it with a DataFrame to get a boolean mask. `columns` names what it reads."""

    def __init__(self, text: str, tree: Node | None, columns: frozenset[str]):
        self.text = text
        self.tree = tree
        self.columns = columns

    def __call__(self, frame: pd.DataFrame) -> pd.Series:
        if self.tree is None:
            import pandas as pd

            return pd.Series(True, index=frame.index, dtype=bool)
        return _evaluate(self.tree, frame)

    def __repr__(self) -> str:
        return f"CompiledFilter({self.text!r})"


def compile_filter(text: str | None, columns: Collection[str]) -> CompiledFilter:
    """Parse `text` against the known `columns`; FilterError says what is wrong. Empty text keeps every row."""
    if text is None:
        return CompiledFilter("", None, frozenset())
    if not isinstance(text, str):
        raise FilterError("the filter must be text")
    if not text.strip():
        return CompiledFilter("", None, frozenset())
    if len(text) > MAX_FILTER_LENGTH:
        raise FilterError(f"the filter is longer than {MAX_FILTER_LENGTH} characters")
    parser = _Parser(_tokenize(text))
    tree = parser.parse()
    known = set(columns)
    unknown = list(dict.fromkeys(c for c in parser.columns if c not in known))
    if unknown:
        message = "unknown column" + ("s " if len(unknown) > 1 else " ") + ", ".join(repr(c) for c in unknown)
        if len(unknown) == 1:
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
        listed = sorted(known)
        more = f" and {len(listed) - 20} more" if len(listed) > 20 else ""
        message += f"; the source has: {', '.join(listed[:20])}{more}"
        raise FilterError(message)
    return CompiledFilter(text, tree, frozenset(parser.columns))


def parse_filter(text: str | None) -> CompiledFilter:
    """The filter parsed before the source's columns are known (when a job is created; an InfluxDB measurement's
    columns only show with its rows): syntax and refused constructs are checked now, the column names once the rows
    have been read. FilterError says what is wrong."""
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_FILTER_LENGTH:
        return compile_filter(text, ())  # empty, not text or too long: compile_filter says so
    parser = _Parser(_tokenize(text))
    parser.parse()
    return compile_filter(text, parser.columns)
