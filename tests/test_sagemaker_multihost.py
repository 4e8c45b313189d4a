"""The SageMaker contract on two "hosts": two processes on loopback, each with its own /opt/ml root and
resourceconfig.json, run the real entrypoint module with torchrun across them (gloo, CPU). Rank 0 is on the
first host, and only the first host publishes to /opt/ml/model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from job.platforms import sagemaker

REPO = Path(__file__).resolve().parents[1]
HOSTS = ("localhost", "127.0.0.1")  # two names for this machine: host 1 and host 2
JOB = "finetune-multihost-test"


def _root(tmp_path: Path, host: str, hyperparameters: dict[str, str]) -> Path:
    root = tmp_path / f"ml-{host}"
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    (root / "input" / "config" / "resourceconfig.json").write_text(json.dumps(
        {"current_host": host, "hosts": list(HOSTS), "network_interface_name": "lo"}))
    return root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_launch_command_puts_rank_0_on_the_first_host(tmp_path: Path):
    roots = [_root(tmp_path, host, {}) for host in HOSTS]
    clusters = [sagemaker.read_cluster(root) for root in roots]
    assert [c.node_rank for c in clusters] == [0, 1] and [c.is_first for c in clusters] == [True, False]
    cmd = sagemaker.launch_command(clusters[1], gpus=8, environ={})
    assert cmd[1:3] == ["-m", "job.platforms.launch"] and cmd[-2:] == ["-m", "job"]
    assert {"--nnodes=2", "--node-rank=1", "--nproc-per-node=8", "--master-addr=localhost",
            "--master-port=29500"} <= set(cmd)
    # SageMaker kills the container 120 s after SIGTERM: torchrun must leave the launcher time to report
    assert f"--shutdown-timeout={sagemaker.SHUTDOWN_TIMEOUT_S}" in cmd and sagemaker.SHUTDOWN_TIMEOUT_S <= 110
    single = sagemaker.Cluster(hosts=("algo-1",), current_host="algo-1")
    assert sagemaker.launch_command(single, gpus=1, environ={}) == list(sagemaker.CLI_COMMAND)
    assert "--nproc-per-node=4" in sagemaker.launch_command(single, gpus=4, environ={})
    assert sagemaker.launch_environment(clusters[0], {}) == {"NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo"}
    assert sagemaker.gpu_count({"SM_NUM_GPUS": "4"}) == 4


def test_bad_resource_config_fails_with_exit_2(tmp_path: Path):
    root = _root(tmp_path, "algo-9", {})
    assert sagemaker.main(root=root, environ={"SM_NUM_GPUS": "0"}) == 2
    assert "current_host 'algo-9' is not one of hosts" in (root / "output" / "failure").read_text()


@pytest.mark.timeout(600)
def test_two_hosts_train_together_and_only_the_first_publishes(tmp_path: Path, tiny_model: Path, sample_path: Path):
    hyperparameters = {
        "config": "gemma-2b-it-lora", "model.name": str(tiny_model), "data.source": str(sample_path),
        "data.max_train_rows": "16", "data.max_eval_rows": "2", "evaluation.max_new_tokens": "4",
        "evaluation.compare_base": "false", "training.max_steps": "2", "training.per_device_batch_size": "2",
        "training.gradient_accumulation_steps": "1", "training.logging_steps": "1",
        "training.gradient_checkpointing": "false",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    env |= {"PYTHONPATH": str(REPO), "SM_NUM_GPUS": "0", "TRAINING_JOB_NAME": JOB,
            "FINETUNE_MASTER_PORT": str(_free_port()), "FINETUNE_CACHE_DIR": str(tmp_path / "cache")}
    roots = [_root(tmp_path, host, hyperparameters) for host in HOSTS]
    procs = [subprocess.Popen([sys.executable, "-m", "job.platforms.sagemaker"], env={**env, "SM_ROOT": str(root)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for root in roots]
    results = [proc.communicate(timeout=540) for proc in procs]
    for proc, (_, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr[-4000:]
    first, second = results[0][1], results[1][1]
    assert "host localhost (1 of 2)" in first and "--node-rank=0" in first and "--master-addr=localhost" in first
    assert "host 127.0.0.1 (2 of 2)" in second and "--node-rank=1" in second

    model = roots[0] / "model" / JOB
    published = {p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()}
    assert "manifest.json" in published and "adapter/adapter_model.safetensors" in published
    assert not any(path.startswith("checkpoints/") for path in published), "model.tar.gz holds no checkpoints"
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["run_id"] == JOB and manifest["checkpoints"]["files"]
    assert not any((roots[1] / "model").iterdir()), "only the first host publishes"
    assert not (roots[0] / "output" / "failure").exists() and not (roots[1] / "output" / "failure").exists()
