"""Errors the job reports as one line, each with the exit code that orchestrators rely on."""

from __future__ import annotations

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


class PreemptedError(JobError):
    """Training stopped on SIGTERM after saving a checkpoint."""

    exit_code = EXIT_PREEMPTED
