"""SageMaker training-container contract: `docker run IMAGE train` runs `finetune run` on SageMaker's paths.

- `/opt/ml/input/config/hyperparameters.json` (values are strings): `config` -> `--config`, each
  `section.key` -> `--set section.key=value`; keys the SDK adds (`sagemaker_*`) are skipped, others rejected.
- Input channels `/opt/ml/input/data/<channel>`: `train` -> `data.source`, `model` -> `model.name`.
- The run folder is `/opt/ml/checkpoints/<TRAINING_JOB_NAME>/`, which SageMaker syncs with `checkpoint_s3_uri`
  and restores when managed spot restarts the job, so `--resume auto` continues from its trainer checkpoints
  (written once, nowhere else). When the run is complete, the first host copies the published run (the files
  its manifest lists: adapter, reports, logs, config; no checkpoints) to `/opt/ml/model/<TRAINING_JOB_NAME>/`,
  which SageMaker uploads as model.tar.gz.
- Several hosts (`/opt/ml/input/config/resourceconfig.json`) or GPUs: torchrun (job.platforms.launch) with one
  process per GPU, `--nnodes` = hosts, node rank = the host's place in `hosts`, so rank 0 is on the first
  host, which alone publishes; the rendezvous is the first host on port 29500 (`FINETUNE_MASTER_PORT`).
- The CLI runs as a child process that gets SIGTERM/SIGINT forwarded; on failure the last error line of its
  stderr, with secrets redacted, goes to `/opt/ml/output/failure` (SageMaker's FailureReason) and its exit
  code is this process's exit code. SageMaker kills the container 120 s after SIGTERM, so torchrun is given
  `--shutdown-timeout` SHUTDOWN_TIMEOUT_S for the processes' checkpoint.
- `FINETUNE_HF_TOKEN_SECRET` (a Secrets Manager secret's ARN or name, set by `submit.py --hf-token-secret`):
  its value becomes the CLI's `HF_TOKEN`, read here with the job's role, so the token never appears in the
  training job's description. The secret holds the token itself, or JSON with an `HF_TOKEN` key.

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
from dataclasses import dataclass
from pathlib import Path

from job.errors import EXIT_UNEXPECTED, ConfigError, JobError, MissingInputError

DEFAULT_ROOT = Path("/opt/ml")
CLI_COMMAND: tuple[str, ...] = (sys.executable, "-m", "job")
"""What runs the CLI; the arguments from `build_cli_args` are appended."""
CHANNEL_FIELDS = {"train": "data.source", "model": "model.name"}
SDK_KEY_PREFIX = "sagemaker_"
MASTER_PORT = 29500
SHUTDOWN_TIMEOUT_S = 100
"""torchrun's wait for the processes' checkpoint after SIGTERM: SageMaker kills the container 120 s after it."""
HF_TOKEN_SECRET_ENV = "FINETUNE_HF_TOKEN_SECRET"
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
        f"output.uri={_quoted(str(root / 'checkpoints'))}",
        f"output.run_id={_quoted(job_name(environ))}",
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


def job_name(environ: Mapping[str, str]) -> str:
    return environ.get("TRAINING_JOB_NAME") or "sagemaker"


@dataclass(frozen=True)
class Cluster:
    """The training job's hosts, from resourceconfig.json (one host `algo-1` when the file is absent)."""

    hosts: tuple[str, ...]
    current_host: str
    network_interface: str | None = None

    @property
    def node_rank(self) -> int:
        return self.hosts.index(self.current_host)

    @property
    def is_first(self) -> bool:
        return self.node_rank == 0


def read_cluster(root: Path) -> Cluster:
    path = root / "input" / "config" / "resourceconfig.json"
    if not path.is_file():
        return Cluster(hosts=("algo-1",), current_host="algo-1")
    try:
        data = json.loads(path.read_text())
        hosts = tuple(str(host) for host in data["hosts"])
        current = str(data["current_host"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: cannot read hosts/current_host ({exc.__class__.__name__})") from None
    if current not in hosts:
        raise ConfigError(f"{path}: current_host {current!r} is not one of hosts {list(hosts)}")
    return Cluster(hosts=hosts, current_host=current, network_interface=data.get("network_interface_name"))


def gpu_count(environ: Mapping[str, str]) -> int:
    """GPUs of this instance: `SM_NUM_GPUS` when set, else what torch sees."""
    if environ.get("SM_NUM_GPUS", "").strip():
        try:
            return max(int(environ["SM_NUM_GPUS"]), 0)
        except ValueError:
            raise ConfigError(f"SM_NUM_GPUS={environ['SM_NUM_GPUS']!r}: expected a number") from None
    import torch

    return torch.cuda.device_count()


def launch_command(cluster: Cluster, gpus: int, environ: Mapping[str, str]) -> list[str]:
    """What runs the CLI on this host: the CLI itself for one process, else torchrun (job.platforms.launch,
    which keeps the exit codes) with one process per GPU and a static rendezvous on the first host."""
    nproc = max(gpus, 1)
    if len(cluster.hosts) == 1 and nproc == 1:
        return list(CLI_COMMAND)
    port = environ.get("FINETUNE_MASTER_PORT") or str(MASTER_PORT)
    return [
        sys.executable, "-m", "job.platforms.launch",
        f"--nnodes={len(cluster.hosts)}", f"--node-rank={cluster.node_rank}", f"--nproc-per-node={nproc}",
        f"--master-addr={cluster.hosts[0]}", f"--master-port={port}", f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}",
        "-m", "job",
    ]


def launch_environment(cluster: Cluster, environ: Mapping[str, str]) -> dict[str, str]:
    """What the CLI's environment adds to this process's: NCCL and gloo use SageMaker's network interface."""
    if not cluster.network_interface or len(cluster.hosts) == 1:
        return {}
    return {name: environ.get(name) or cluster.network_interface
            for name in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")}


def hf_token_from_secret(environ: Mapping[str, str]) -> dict[str, str]:
    """`{"HF_TOKEN": value}` read from the Secrets Manager secret that `FINETUNE_HF_TOKEN_SECRET` names (its ARN
    gives the region), or {} when none is named or HF_TOKEN is already set. A secret that cannot be read is a
    MissingInputError (exit 3) naming it, never its value."""
    secret_id = environ.get(HF_TOKEN_SECRET_ENV, "").strip()
    if not secret_id or environ.get("HF_TOKEN"):
        return {}
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    parts = secret_id.split(":")
    region = parts[3] if secret_id.startswith("arn:") and len(parts) > 3 else None
    try:
        value = boto3.client("secretsmanager", region_name=region).get_secret_value(SecretId=secret_id)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise MissingInputError(f"{HF_TOKEN_SECRET_ENV}={secret_id}: cannot read the secret ({code}); the job's "
                                "role needs secretsmanager:GetSecretValue on it") from None
    except BotoCoreError as exc:
        raise MissingInputError(f"{HF_TOKEN_SECRET_ENV}={secret_id}: cannot read the secret "
                                f"({type(exc).__name__})") from None
    text = value.get("SecretString")
    if text is None:
        raise MissingInputError(f"{HF_TOKEN_SECRET_ENV}={secret_id}: the secret holds binary data, not a token")
    text = text.strip()
    if text.startswith("{"):
        try:
            text = str(json.loads(text)["HF_TOKEN"]).strip()
        except (ValueError, KeyError, TypeError):
            raise MissingInputError(f"{HF_TOKEN_SECRET_ENV}={secret_id}: a JSON secret needs an HF_TOKEN key") from None
    if not text:
        raise MissingInputError(f"{HF_TOKEN_SECRET_ENV}={secret_id}: the secret is empty")
    return {"HF_TOKEN": text}


def publish_model(root: Path, environ: Mapping[str, str]) -> Path:
    """Copy the finished run from /opt/ml/checkpoints/<job> to /opt/ml/model/<job>: exactly the files its
    manifest lists, each verified, and no checkpoints (they stay in the checkpoint prefix)."""
    from job.storage.artifacts import pull_run

    name = job_name(environ)
    return pull_run(str(root / "checkpoints" / name), root / "model" / name)


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
        if len(value) >= 8 and _SECRET_ENV_NAME.search(name) and name != HF_TOKEN_SECRET_ENV:  # that one: an ARN
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


def _run_forwarding_signals(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """Run `cmd` (with `env` added to the environment), forwarding SIGTERM/SIGINT and teeing stderr; its exit
    code (128+N if killed by signal N)."""
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
        proc = subprocess.Popen(list(cmd), stderr=subprocess.PIPE, start_new_session=True,
                                env=None if not env else {**os.environ, **env})
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
    """Run the training job as SageMaker expects; returns the exit code (the CLI's on failure). `command`
    replaces the launch command (tests)."""
    environ = os.environ if environ is None else environ
    root = sagemaker_root(environ) if root is None else root
    try:
        args = build_cli_args(root, environ)
        cluster = read_cluster(root)
        _prepare_dirs(root)
        launcher = list(command) if command is not None else launch_command(cluster, gpu_count(environ), environ)
        secrets = hf_token_from_secret(environ)
    except JobError as exc:
        _write_failure(root, f"exit {exc.exit_code}: {redact(str(exc), environ)}"[:FAILURE_MAX_CHARS])
        return exc.exit_code
    environ = {**environ, **secrets}  # the CLI's error lines are redacted with the token it was given
    for name in unused_channels(root):
        print(f"sagemaker: warning: input channel {name!r} is unused (known: train, model)", file=sys.stderr)

    finished = (root / "checkpoints" / job_name(environ) / "manifest.json").is_file()
    if finished:  # a restarted job whose run completed: only the copy to /opt/ml/model is left
        print("sagemaker: the run is complete (restored from the checkpoint prefix); not training again",
              file=sys.stderr, flush=True)
    else:
        cmd = [*launcher, *args]
        print(f"sagemaker: host {cluster.current_host} ({cluster.node_rank + 1} of {len(cluster.hosts)}): "
              f"{' '.join(cmd)}", file=sys.stderr, flush=True)
        try:
            code, tail = _run_forwarding_signals(cmd, {**launch_environment(cluster, environ), **secrets})
        except OSError as exc:
            _write_failure(root, f"exit {EXIT_UNEXPECTED}: cannot start {cmd[0]} ({exc.strerror})")
            return EXIT_UNEXPECTED
        if code != 0:
            _write_failure(root, failure_reason(tail, code, environ))
            return code
    if not cluster.is_first:
        return 0  # rank 0 runs on the first host, which alone publishes
    if "output.uri" in read_hyperparameters(root):
        print("sagemaker: output.uri was set by a hyperparameter: the run was published there, not to "
              "/opt/ml/model", file=sys.stderr, flush=True)
        return 0
    try:
        model = publish_model(root, environ)
    except JobError as exc:
        _write_failure(root, f"exit {exc.exit_code}: {redact(str(exc), environ)}"[:FAILURE_MAX_CHARS])
        return exc.exit_code
    print(f"sagemaker: published {model} (uploaded as model.tar.gz)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
