"""SageMaker training-container contract: `docker run IMAGE train` runs `finetune run` on SageMaker's paths.

- `/opt/ml/input/config/hyperparameters.json` (values are strings): `config` -> `--config`, each
  `section.key` -> `--set section.key=value`; keys the SDK adds (`sagemaker_*`) are skipped, others rejected.
- Input channels `/opt/ml/input/data/<channel>`: `train` -> `data.source`, `model` -> `model.name`.
- The run goes to `/opt/ml/model/<TRAINING_JOB_NAME>/` (SageMaker uploads it as model.tar.gz); checkpoints
  to `/opt/ml/checkpoints`, which SageMaker syncs with `checkpoint_s3_uri` so managed spot resumes
  (`--resume auto`).
- The CLI runs as a child process that gets SIGTERM/SIGINT forwarded; on failure the last error line of its
  stderr, with secrets redacted, goes to `/opt/ml/output/failure` (SageMaker's FailureReason) and its exit
  code is this process's exit code.

`SM_ROOT` (or the `root` argument) replaces `/opt/ml`, for tests and local dry runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from job.errors import EXIT_UNEXPECTED, ConfigError, JobError, MissingInputError

DEFAULT_ROOT = Path("/opt/ml")
CLI_COMMAND: tuple[str, ...] = (sys.executable, "-m", "job")
"""What runs the CLI; the arguments from `build_cli_args` are appended."""
CHANNEL_FIELDS = {"train": "data.source", "model": "model.name"}
SDK_KEY_PREFIX = "sagemaker_"
FAILURE_MAX_CHARS = 1000  # SageMaker keeps the first 1024 characters of the failure file
_STDERR_TAIL_BYTES = 64 * 1024

_ERROR_LINE = re.compile(r"\b(error|fatal|exception)\b|\w(Error|Exception)\b", re.IGNORECASE)
_SECRET_ENV_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|PRIVATE|_KEY$|APIKEY", re.IGNORECASE)
_SECRET_PATTERNS = re.compile(
    r"hf_[A-Za-z0-9]{16,}"  # Hugging Face tokens
    r"|\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"  # AWS access key ids
    r"|(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"  # user:password@ in URLs
    r"|(?<=Bearer )[A-Za-z0-9._~+/=-]+"
)


def sagemaker_root(environ: Mapping[str, str]) -> Path:
    """`$SM_ROOT`, else `/opt/ml`."""
    return Path(environ.get("SM_ROOT") or DEFAULT_ROOT)


def _hyperparameter_value(value: object) -> str:
    """SageMaker passes strings, which the SDK's framework estimators JSON-encode (`'"x"'`): unwrap those.

    Other JSON values (numbers, booleans, lists from a hand-written file) become JSON text, which the CLI's
    `--set` parses as YAML into the same value.
    """
    if isinstance(value, str):
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                decoded = json.loads(value)
            except json.JSONDecodeError:
                return value
            if isinstance(decoded, str):
                return decoded
        return value
    return json.dumps(value)


def read_hyperparameters(root: Path) -> dict[str, str]:
    """`<root>/input/config/hyperparameters.json` as key -> string value; {} when the file is absent."""
    path = root / "input" / "config" / "hyperparameters.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read hyperparameters ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of hyperparameters")
    return {str(key): _hyperparameter_value(value) for key, value in data.items()}


def _quoted(value: str) -> str:
    """A `--set` value that the CLI's YAML parsing reads back as exactly this string."""
    import yaml

    try:
        if yaml.safe_load(value) == value:
            return value
    except yaml.YAMLError:
        pass
    return json.dumps(value)


def _channel_dirs(root: Path) -> dict[str, Path]:
    data = root / "input" / "data"
    if not data.is_dir():
        return {}
    return {entry.name: entry for entry in sorted(data.iterdir()) if entry.is_dir()}


def _model_path(channel: Path) -> Path:
    """The model channel's folder, or its single `.gguf` file when it holds one and no config.json."""
    ggufs = sorted(channel.glob("*.gguf"))
    if len(ggufs) == 1 and not (channel / "config.json").exists():
        return ggufs[0]
    return channel


def _unknown_key_hint(key: str) -> str:
    from job.config import JobConfig

    fields = JobConfig.model_fields
    sections = [name for name, field in fields.items() if key in field.annotation.model_fields]
    if sections:
        return f" (did you mean {' or '.join(f'{section}.{key}' for section in sections)}?)"
    return ""


def build_cli_args(root: Path, environ: Mapping[str, str]) -> list[str]:
    """The `finetune` arguments for this training job (pure: reads files under `root`, runs nothing).

    SageMaker's paths are set first, then the user's `section.key` hyperparameters, so a hyperparameter such
    as `output.uri` overrides the default (the CLI applies `--set` in order, after `FINETUNE_*` variables).
    """
    hyperparameters = read_hyperparameters(root)
    args = ["run"]
    config = hyperparameters.pop("config", "")
    if config:
        args += ["--config", config]

    overrides = [
        f"output.uri={_quoted(str(root / 'model'))}",
        f"output.run_id={_quoted(environ.get('TRAINING_JOB_NAME') or 'sagemaker')}",
        f"training.checkpoint_uri={_quoted(str(root / 'checkpoints'))}",
    ]
    channels = _channel_dirs(root)
    if "train" in channels:
        overrides.append(f"data.source={_quoted(str(channels['train']))}")
    if "model" in channels:
        overrides.append(f"model.name={_quoted(str(_model_path(channels['model'])))}")

    unknown = []
    for key, value in sorted(hyperparameters.items()):
        if key.startswith(SDK_KEY_PREFIX):
            continue
        section, dot, field = key.partition(".")
        if dot and section and field and "." not in field:
            overrides.append(f"{key}={value}")  # the CLI validates section and field names and the value
        else:
            unknown.append(key)
    if unknown:
        hints = "".join(_unknown_key_hint(key) for key in unknown)
        raise ConfigError(
            f"unknown hyperparameter(s) {', '.join(map(repr, unknown))}{hints}: use 'config' (a preset or "
            "YAML path) or section.key overrides such as training.max_steps"
        )
    for item in overrides:
        args += ["--set", item]
    return [*args, "--resume", "auto"]


def unused_channels(root: Path) -> list[str]:
    """Input channels this container does not read (reported as a warning)."""
    return [name for name in _channel_dirs(root) if name not in CHANNEL_FIELDS]


def _prepare_dirs(root: Path) -> None:
    for name in ("model", "checkpoints", "output"):
        path = root / name
        with contextlib.suppress(OSError):
            path.mkdir(parents=True, exist_ok=True)
        if not (path.is_dir() and os.access(path, os.W_OK)):
            raise MissingInputError(
                f"{path} is not writable by uid {os.getuid()}: SageMaker mounts it as root; "
                "use the image built with --target sagemaker"
            )


def redact(text: str, environ: Mapping[str, str]) -> str:
    """`text` without the values of secret-looking environment variables or token-shaped strings."""
    for name, value in environ.items():
        if len(value) >= 8 and _SECRET_ENV_NAME.search(name):
            text = text.replace(value, "***")
    return _SECRET_PATTERNS.sub("***", text)


def failure_reason(stderr_tail: bytes, exit_code: int, environ: Mapping[str, str]) -> str:
    """One line for SageMaker's FailureReason: the last error-looking stderr line, else the last line."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", stderr_tail.decode("utf-8", "replace"))]
    lines = [line for line in lines if line]
    line = next((line for line in reversed(lines) if _ERROR_LINE.search(line)), lines[-1] if lines else "")
    reason = f"exit {exit_code}: {line}" if line else f"finetune exited with code {exit_code}"
    return redact(reason, environ)[:FAILURE_MAX_CHARS]


def _write_failure(root: Path, reason: str) -> None:
    print(f"sagemaker: {reason}", file=sys.stderr, flush=True)
    try:
        (root / "output").mkdir(parents=True, exist_ok=True)
        (root / "output" / "failure").write_text(reason + "\n")
    except OSError as exc:
        print(f"sagemaker: cannot write {root / 'output' / 'failure'} ({exc.strerror})", file=sys.stderr)


def _run_forwarding_signals(cmd: Sequence[str]) -> tuple[int, bytes]:
    """Run `cmd`, forwarding SIGTERM/SIGINT and teeing stderr; its exit code (128+N if killed by signal N)."""
    state: dict[str, object] = {"proc": None, "pending": []}

    def forward(signum: int, _frame: object) -> None:
        proc = state["proc"]
        if proc is None:
            state["pending"].append(signum)
        elif proc.poll() is None:
            proc.send_signal(signum)

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, forward)
    except ValueError:  # not the main thread (embedded use): signals are not forwarded
        pass
    tail = bytearray()
    out = getattr(sys.stderr, "buffer", None)
    try:
        # Own session: a terminal's Ctrl-C reaches the CLI once (forwarded), not twice.
        proc = subprocess.Popen(list(cmd), stderr=subprocess.PIPE, start_new_session=True)
        state["proc"] = proc
        for signum in state["pending"]:
            proc.send_signal(signum)
        while chunk := os.read(proc.stderr.fileno(), 65536):
            if out is not None:
                out.write(chunk)
                out.flush()
            else:
                sys.stderr.write(chunk.decode("utf-8", "replace"))
            tail += chunk
            del tail[:-_STDERR_TAIL_BYTES]
        proc.stderr.close()
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return (128 - code if code < 0 else code), bytes(tail)


def main(
    root: Path | None = None,
    environ: Mapping[str, str] | None = None,
    command: Sequence[str] | None = None,
) -> int:
    """Run the training job as SageMaker expects; returns the exit code (the CLI's on failure)."""
    environ = os.environ if environ is None else environ
    root = sagemaker_root(environ) if root is None else root
    try:
        args = build_cli_args(root, environ)
        _prepare_dirs(root)
    except JobError as exc:
        _write_failure(root, f"exit {exc.exit_code}: {redact(str(exc), environ)}"[:FAILURE_MAX_CHARS])
        return exc.exit_code
    for name in unused_channels(root):
        print(f"sagemaker: warning: input channel {name!r} is unused (known: train, model)", file=sys.stderr)

    cmd = [*(CLI_COMMAND if command is None else command), *args]
    print(f"sagemaker: finetune {' '.join(args)}", file=sys.stderr, flush=True)
    try:
        code, tail = _run_forwarding_signals(cmd)
    except OSError as exc:
        _write_failure(root, f"exit {EXIT_UNEXPECTED}: cannot start {cmd[0]} ({exc.strerror})")
        return EXIT_UNEXPECTED
    if code != 0:
        _write_failure(root, failure_reason(tail, code, environ))
    return code


if __name__ == "__main__":
    sys.exit(main())
