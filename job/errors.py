"""Errors the job reports as one line, each with the exit code that orchestrators rely on."""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_MISSING_INPUT = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after saving a checkpoint; safe to retry with --resume auto


class JobError(Exception):
    """An expected failure: printed as one line (no traceback) and mapped to `exit_code`."""

    exit_code = EXIT_UNEXPECTED


class ConfigError(JobError):
    """Bad usage or configuration: unknown key, wrong type, bad value, unknown preset."""

    exit_code = EXIT_USAGE


class MissingInputError(JobError):
    """An input that does not exist or cannot be reached: file, bucket, object, credentials."""

    exit_code = EXIT_MISSING_INPUT


class CorruptInputError(JobError):
    """An input that exists but is not what it must be: bytes that are not UTF-8, a line that is not JSON or
    lacks its fields, an empty file, a manifest whose entries do not check out."""

    exit_code = EXIT_MISSING_INPUT


class PreemptedError(JobError):
    """Training stopped on SIGTERM after saving a checkpoint."""

    exit_code = EXIT_PREEMPTED


_URL_CREDENTIALS = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^\s'\"]*@")
"""Up to the last `@` of the word: a password may hold `/` or `@` (over-redacting a path is harmless)."""
_SESSION_TOKEN = re.compile(r"((?:X-Amz-Security-Token|x-amz-security-token|aws_session_token)['\"]?\s*[:=]\s*b?['\"]?)"
                            r"[A-Za-z0-9/+=%]{16,}")


def redact(text: str) -> str:
    """`text` without credentials a URL can carry (`scheme://user:password@host` -> `scheme://***@host`) or an
    AWS session token: for every line the job prints or logs."""
    return _SESSION_TOKEN.sub(r"\1***", _URL_CREDENTIALS.sub(r"\1***@", text))
