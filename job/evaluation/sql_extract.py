"""Pull the SQL out of a model's answer: code fences, leading prose, trailing explanations, chat tokens."""

from __future__ import annotations

import re
import sqlite3

_END_TOKENS = re.compile(r"<end_of_turn>|<eos>|</s>|<\|(?:im_end|eot_id|endoftext|end|eom_id)\|>", re.I)
_ROLE_START = re.compile(r"<start_of_turn>\s*model\b|<\|im_start\|>\s*assistant\b|<\|assistant\|>", re.I)
_SPECIAL_TOKENS = re.compile(
    r"<\|[a-z_]{1,30}\|>|</?(?:s|bos|eos|pad|unk|start_of_turn|end_of_turn)>|\[/?INST\]|<<\/?SYS>>", re.I
)
_FENCE = re.compile(r"```[ \t]*+([A-Za-z0-9_+-]*+)[^\n]{0,200}+\n(.*?)(?:```|\Z)", re.S)
"""Possessive and bounded before the newline, so a long line full of backticks is read in linear time."""
_STATEMENT_START = re.compile(
    r"(?:SELECT|INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER|VALUES|PRAGMA|ATTACH|DETACH|VACUUM|EXPLAIN|BEGIN"
    r"|COMMIT|ROLLBACK|ANALYZE|REINDEX|SAVEPOINT|RELEASE)\b"
    r"|WITH\s+(?:RECURSIVE\s+)?[\w\"`\[\]]+\s*(?:\([^()]*\)\s*)?AS\s*(?:(?:NOT\s+)?MATERIALIZED\s*)?\(",
    re.I,
)
_SQL_FENCE_TAGS = frozenset({"", "sql", "sqlite", "sqlite3", "mysql", "postgresql", "postgres", "tsql"})
_MAX_CHARS = 100_000
_MAX_STATEMENTS = 100
_MAX_SEMICOLONS = 1_000
_KEYWORD_WORD = re.compile(r"[A-Za-z]+")
_CONTINUATION = re.compile(
    r"(?:FROM|WHERE|GROUP|ORDER|HAVING|LIMIT|OFFSET|JOIN|INNER|LEFT|RIGHT|FULL|CROSS|NATURAL|ON|AND|OR|UNION"
    r"|INTERSECT|EXCEPT|SET|VALUES|SELECT|WINDOW|RETURNING|AS|CASE|WHEN|THEN|ELSE|END)\b|[(),*]",
    re.I,
)
_PROSE_LINE = re.compile(
    r"(?:This|The|These|Those|That|It|Its|Note|Explanation|Here|In this|In the|We|I|You|Output|Result|Answer"
    r"|Hope|Let|Alternatively|Also|Assuming|If you|To |Make sure)\b"
    r"|[#>]|\*\*|[-*+][ \t]|\d+[.)][ \t]|[A-Z][a-z]+(?:[ \t]+[a-z]+){3}[^;]*[.:]\s*$",
)
"""`{3}` and not `{3,}`: `[^;]*` takes any further words, and `{3,}` before it backtracks quadratically."""


def extract_sql(text: str) -> str:
    """The SQL statement(s) in a model answer, or "" when nothing SQL-like is found.

    Takes the first fenced block that holds SQL (```sql or plain ```), else the first statement that starts a
    line or follows a colon; keeps further statements that directly follow a `;`; stops at trailing prose, a
    blank line before prose, or a chat end token. Reads at most 100,000 characters and keeps at most 100
    statements. Idempotent: `extract_sql(extract_sql(t)) == extract_sql(t)`.
    """
    text = _strip_chat_tokens((text or "")[:_MAX_CHARS])
    blocks = sorted(_FENCE.finditer(text), key=lambda m: m.group(1).lower() not in _SQL_FENCE_TAGS)
    for match in blocks:
        found = _from_text(match.group(2))
        if found:
            return found
    return _from_text(text.replace("```", "\n"))


def _strip_chat_tokens(text: str) -> str:
    starts = list(_ROLE_START.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = _END_TOKENS.search(text)
    if end and text[: end.start()].strip():
        text = text[: end.start()]
    return _SPECIAL_TOKENS.sub("\n", text)


def _from_text(text: str) -> str:
    start = _find_start(text)
    return "" if start is None else _take_statements(text[start:])


def _find_start(text: str) -> int | None:
    """Offset of the first statement keyword at a line start or after a colon; else an upper-case keyword."""
    for match in re.finditer(r"(?:^|\n|:)[ \t]*", text):
        candidate = _STATEMENT_START.match(text, match.end())
        if candidate and _looks_like_keyword(candidate.group(0)):
            return candidate.start()
    for candidate in _STATEMENT_START.finditer(text):
        if _KEYWORD_WORD.match(candidate.group(0)).group(0).isupper():
            return candidate.start()
    return None


def _looks_like_keyword(word: str) -> bool:
    """'SELECT' or 'select', not 'Select' (which starts prose more often than code)."""
    first = _KEYWORD_WORD.match(word).group(0)
    return first.isupper() or first.islower()


def _take_statements(text: str) -> str:
    """Statements from the start of `text` until prose; SQLite's tokenizer decides where a statement ends."""
    statements: list[str] = []
    current = ""
    checked = tried = 0  # where the search for the current statement's end resumes; `;` tried so far
    lines = text.split("\n")
    index = 0
    while index < len(lines) and len(statements) < _MAX_STATEMENTS:
        line, stripped = lines[index], lines[index].strip()
        index += 1
        if not current:
            if not stripped:
                continue
            if statements and not (_STATEMENT_START.match(stripped) and _looks_like_keyword(stripped)):
                break
            current = line
        elif not stripped:
            following = next((i for i in range(index, len(lines)) if lines[i].strip()), len(lines))
            if following == len(lines) or not _is_continuation(lines[following].strip()):
                break
            index = following  # the blank lines in between belong to nothing
            continue
        elif _is_prose(stripped):
            break
        else:
            current = f"{current}\n{line}"
        end, checked, tried = _statement_end(current, checked, tried)
        if end is not None:
            statements.append(current[:end].strip())
            current, rest, checked, tried = "", current[end:], 0, 0
            if rest.strip():
                lines.insert(index, rest)
    if current.strip():
        statements.append(current.strip())
    return "\n".join(statements)


def _statement_end(buffer: str, start: int, tried: int) -> tuple[int | None, int, int]:
    """(offset just past the first `;` at or after `start` that ends a complete statement, or None; where to
    resume; `;` tried). Stops trying after _MAX_SEMICOLONS per statement, so that text full of `;` inside an
    unclosed quote costs linear, not cubic, time."""
    position = buffer.find(";", start)
    while position != -1 and tried < _MAX_SEMICOLONS:
        tried += 1
        if _complete(buffer[: position + 1]):
            return position + 1, 0, tried
        position = buffer.find(";", position + 1)
    return None, len(buffer), tried


def _complete(text: str) -> bool:
    """`sqlite3.complete_statement`, also for text it cannot encode (NUL, lone surrogates: one char each)."""
    try:
        return sqlite3.complete_statement(text)
    except ValueError:  # UnicodeEncodeError included
        return sqlite3.complete_statement(text.replace("\x00", " ").encode("utf-8", "replace").decode("utf-8"))


def _is_continuation(line: str) -> bool:
    return bool(line) and not _is_prose(line) and bool(_CONTINUATION.match(line))


def _is_prose(line: str) -> bool:
    return bool(line) and not line.startswith("--") and bool(_PROSE_LINE.match(line))
