"""Several processes under torchrun (`python -m job.platforms.launch`, gloo on CPU): data-parallel training, one writer,
SIGTERM shared by all ranks, a dead rank failing the run, sharded evaluation equal to a single process."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job.config import load_config
from job.data.prepare import prepare
from job.errors import EXIT_PREEMPTED, ConfigError
from job.train.model import load_tokenizer, resolve_model_path
from job.train.resume import plan_run
from job.train.trainer import read_train_log, train

LAUNCH = [sys.executable, "-m", "job.platforms.launch", "--nproc-per-node", "2", "--monitor-interval", "0.2"]

pytestmark = pytest.mark.distributed

ROWS = 8
"""Every step trains on all rows (global batch 8): a 1-process and a 2-process run see the same batches, whatever
order the samplers pick, so their losses must agree."""
COMMON = [
    f"data.max_train_rows={ROWS}", "data.max_eval_rows=6", "training.gradient_accumulation_steps=1",
    "training.logging_steps=1", "training.learning_rate=5e-3", "training.warmup_ratio=0",
    "training.lr_scheduler=constant", "training.gradient_checkpointing=false", "training.save_steps=1000",
    "training.max_seq_len=1024", "training.collective_timeout_s=60", "evaluation.max_new_tokens=12",
    "evaluation.batch_size=2", "method.lora_dropout=0",  # dropout draws differ per process
]


def _sets(tiny_model, sample_path, *extra):
    items = [f"model.name={tiny_model}", f"data.source={sample_path}", *COMMON, *extra]
    return [arg for item in items for arg in ("--set", item)]


def _launch(args, launch=(), stderr=subprocess.PIPE, **env_extra):
    """`python -m job.platforms.launch --nproc-per-node 2 [LAUNCH...] -m job ARGS`, stdout/stderr captured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_") or k == "FINETUNE_CACHE_DIR"}
    env.update(OMP_NUM_THREADS="1", **env_extra)
    command = [*LAUNCH, *launch, "-m", "job"]
    return subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)


def _single_process(tiny_model, sample_path, out, *extra):
    """The same training in this process, one rank with the whole global batch."""
    cfg = load_config("gemma-2b-it-lora", [f"model.name={tiny_model}", f"data.source={sample_path}", *COMMON,
                                           f"output.uri={out}", f"training.per_device_batch_size={ROWS}", *extra],
                      environ={})
    plan = plan_run(cfg, "never", overwrite=False)
    path = resolve_model_path(plan.cfg.model.name)
    tokenizer = load_tokenizer(plan.cfg.model, path)
    return train(plan.cfg, plan.run, prepare(plan.cfg, tokenizer), checkpoint=None, model_path=path,
                 tokenizer=tokenizer)


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the worker with RANK=`rank` among the launcher's children."""
    for task in Path(f"/proc/{launcher.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return int(child)
    raise AssertionError(f"no worker with RANK={rank}")


def _wait_for_steps(launcher: subprocess.Popen, log_dir: Path, steps: int) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and launcher.poll() is None:
        if (log_dir / "logs" / "train_log.jsonl").is_file() and len(read_train_log(log_dir)) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"training did not reach step {steps}: {launcher.communicate()[1][-3000:]}")


def test_two_processes_train_data_parallel_and_evaluate_like_one(tiny_model, sample_path, tmp_path):
    out = tmp_path / "out"
    stale = out / "r1"  # a finished run that --overwrite replaces: rank 0 alone clears it
    stale.mkdir(parents=True)
    (stale / "manifest.json").write_text("{}")
    (stale / "stale.txt").write_text("old")
    args = ["run", "--config", "gemma-2b-it-lora", "--output", str(out), "--run-id", "r1", "--overwrite",
            *_sets(tiny_model, sample_path, "training.max_steps=3", f"training.per_device_batch_size={ROWS // 2}")]
    launcher = _launch(args)
    _, stderr = launcher.communicate(timeout=400)
    assert launcher.returncode == 0, stderr[-3000:]
    run = out / "r1"
    assert not (run / "stale.txt").exists() and json.loads((run / "manifest.json").read_text())["status"]

    # Data parallel: each rank trained on its own half of every global batch; one log stream, one adapter.
    assert json.loads((run / "data" / "stats.json").read_text())["splits"]["train"]["kept"] == ROWS
    ranks = json.loads((run / "logs" / "ranks.json").read_text())
    assert ranks["world_size"] == 2 and ranks["batches_compared"] == 3
    assert [r["rows"] for r in ranks["ranks"]] == [3 * ROWS // 2] * 2 and ranks["rows_in_several_ranks_batches"] == 0
    assert [entry["step"] for entry in read_train_log(run)] == [1, 2, 3]
    assert stderr.count("step 2/3 ") == 1 and stderr.count("published ") == 1
    assert "global batch 8 = 4 per device x 1 accumulation x 2 processes" in stderr
    card = (run / "adapter" / "README.md").read_text()
    assert "global batch 8 = 4 per device x 1 accumulation x 2 process(es)" in card
    adapters = [path for path in run.rglob("adapter_model.safetensors") if "checkpoints" not in path.parts]
    assert adapters == [run / "adapter" / "adapter_model.safetensors"]

    # The same global batch in one process: the same losses.
    single = _single_process(tiny_model, sample_path, tmp_path / "single", "training.max_steps=3")
    two = [entry["loss"] for entry in read_train_log(run)]
    assert two == pytest.approx([entry["loss"] for entry in single.train_log], rel=1e-4)
    assert two[-1] < two[0]  # it learned

    # Sharded evaluation: the 2-process predictions equal a single process evaluating the same adapter.
    from job.evaluation.evaluate import evaluate_models

    cfg = load_config(str(run / "config.yaml"), [], environ={})
    rows = single_rows = prepare(cfg, load_tokenizer(cfg.model, resolve_model_path(cfg.model.name))).splits.eval
    assert [row["id"] for row in single_rows] == json.loads((run / "data" / "eval_ids.json").read_text())
    one = tmp_path / "eval-one"
    metrics = evaluate_models(cfg, one, adapter=str(run / "adapter"), compare_base=True, rows=rows)
    for label in ("base", "tuned"):
        sharded = (run / "eval" / label / "predictions.jsonl").read_text().splitlines()
        alone = (one / label / "predictions.jsonl").read_text().splitlines()
        assert len(sharded) == len(rows) == 6
        assert [json.loads(line) for line in sharded] == [json.loads(line) for line in alone]
        assert json.loads((run / "eval" / label / "metrics.json").read_text()) == metrics[label]
    assert stderr.count("base: generated") == 3  # three batches of 2 shared by two ranks, not six


def test_sigterm_to_one_rank_stops_both_at_one_step_and_resume_from_s3_finishes(
    tiny_model, sample_path, tmp_path, s3_bucket, s3_client
):
    output = f"s3://{s3_bucket}/runs"
    args = ["train", "--config", "gemma-2b-it-lora", "--output", output, "--run-id", "r1",
            *_sets(tiny_model, sample_path, "training.max_steps=10", f"training.per_device_batch_size={ROWS // 2}")]
    first = _launch(args, FINETUNE_WORK_DIR=str(tmp_path / "machine-1"))
    _wait_for_steps(first, tmp_path / "machine-1" / "r1", 3)
    os.kill(_rank_pid(first, 1), signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == EXIT_PREEMPTED, stderr[-3000:]
    stopped = re.findall(r"error \(rank (\d)\): stopped by SIGTERM at step (\d+)", stderr)
    assert sorted(rank for rank, _ in stopped) == ["0", "1"] and len({step for _, step in stopped}) == 1
    step = int(stopped[0][1])
    assert 3 <= step < 10
    keys = [obj["Key"] for obj in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/r1/")["Contents"]]
    assert {key.split("/")[3] for key in keys if "/checkpoints/" in key} == {f"checkpoint-{step}"}  # exactly one
    assert {f"runs/r1/checkpoints/checkpoint-{step}/{name}" for name in
            ("rng_state_0.pth", "rng_state_1.pth", "trainer_state.json")} <= set(keys)  # both ranks saved it
    assert not any(key.endswith("manifest.json") for key in keys)

    # A new machine (empty work dir): rank 0 alone fetches the checkpoint from the bucket; both ranks resume.
    second = _launch([*args, "--resume", "auto"], FINETUNE_WORK_DIR=str(tmp_path / "machine-2"))
    _, stderr = second.communicate(timeout=400)
    assert second.returncode == 0, stderr[-3000:]
    assert stderr.count(f"resuming from {tmp_path / 'machine-2' / 'r1' / 'checkpoints' / f'checkpoint-{step}'}") == 1
    log = read_train_log(tmp_path / "machine-2" / "r1")
    assert [entry["step"] for entry in log] == list(range(step + 1, 11))
    reference = _single_process(tiny_model, sample_path, tmp_path / "single", "training.max_steps=10")
    assert log[-1]["loss"] == pytest.approx(reference.final_loss, rel=1e-3)
    assert s3_client.head_object(Bucket=s3_bucket, Key="runs/r1/manifest.json")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_nodes(args, machines: Path):
    """Two torchrun "nodes" of 2 processes each on 127.0.0.1, static rendezvous, each with its own work and cache
    folders under `machines/node-<rank>` (no shared disk) and its stderr in `machines/node-<rank>.log`."""
    port = _free_port()
    nodes = []
    for rank in (0, 1):
        machine = machines / f"node-{rank}"
        machine.mkdir(parents=True)
        launch = ["--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port)]
        with (machines / f"node-{rank}.log").open("w") as log:
            nodes.append(_launch(args, launch, stderr=log, FINETUNE_WORK_DIR=str(machine / "work"),
                                 FINETUNE_CACHE_DIR=str(machine / "cache")))
    return nodes


def _finish(nodes, machines: Path, timeout: float) -> list[str]:
    for node in nodes:
        node.communicate(timeout=timeout)
    return [(machines / f"node-{rank}.log").read_text() for rank in (0, 1)]


def test_two_nodes_without_a_shared_disk_stop_together_and_resume_from_the_bucket_mirror(
    tiny_model, sample_path, tmp_path, s3_bucket, s3_client
):
    output = f"s3://{s3_bucket}/runs"
    args = ["train", "--config", "gemma-2b-it-lora", "--output", output, "--run-id", "r1",
            *_sets(tiny_model, sample_path, "training.max_steps=8", "training.per_device_batch_size=2")]
    first = tmp_path / "attempt-1"
    nodes = _two_nodes(args, first)
    _wait_for_steps(nodes[0], first / "node-0" / "work" / "r1", 2)
    nodes[1].send_signal(signal.SIGTERM)  # node 1's launcher, as the kubelet stops a pod
    logs = _finish(nodes, first, timeout=120)
    assert [node.returncode for node in nodes] == [EXIT_PREEMPTED] * 2, logs[0][-2000:] + logs[1][-2000:]
    stopped = re.findall(r"error \(rank (\d)\): stopped by SIGTERM at step (\d+)", "".join(logs))
    assert sorted(rank for rank, _ in stopped) == ["0", "1", "2", "3"] and len({step for _, step in stopped}) == 1
    step = int(stopped[0][1])
    assert 2 <= step < 8
    assert "launch: stopped by SIGTERM; every process stopped safely" in logs[1]

    # The mirror holds every process's RNG state, and rank 0's trainer state records the 4 processes.
    prefix = f"runs/r1/checkpoints/checkpoint-{step}/"
    keys = {obj["Key"] for obj in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/r1/")["Contents"]}
    assert {key.split("/")[3] for key in keys if "/checkpoints/" in key} == {f"checkpoint-{step}"}
    assert {prefix + f"rng_state_{rank}.pth" for rank in range(4)} | {prefix + "trainer_state.json"} <= keys
    state = json.loads(s3_client.get_object(Bucket=s3_bucket, Key=prefix + "trainer_state.json")["Body"].read())
    assert state["stateful_callbacks"]["ProcessCount"]["args"]["world_size"] == 4
    # ...while each node's disk holds only its own ranks' RNG states (rank 0's also the rest)
    local = [first / f"node-{rank}" / "work" / "r1" / "checkpoints" / f"checkpoint-{step}" for rank in (0, 1)]
    assert sorted(p.name for p in local[0].glob("rng_state_*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert sorted(p.name for p in local[1].iterdir()) == ["rng_state_2.pth", "rng_state_3.pth"]

    # Two new machines with empty disks: each node fetches the checkpoint from the bucket, and training continues.
    second = tmp_path / "attempt-2"
    nodes = _two_nodes([*args, "--resume", "auto"], second)
    logs = _finish(nodes, second, timeout=300)
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    resumed = [second / f"node-{rank}" / "work" / "r1" / "checkpoints" / f"checkpoint-{step}" for rank in (0, 1)]
    assert logs[0].count(f"resuming from {resumed[0]}") == 1
    assert {"trainer_state.json", "rng_state_2.pth", "rng_state_3.pth"} <= {p.name for p in resumed[1].iterdir()}
    assert [entry["step"] for entry in read_train_log(second / "node-0" / "work" / "r1")] == list(range(step + 1, 9))
    assert s3_client.head_object(Bucket=s3_bucket, Key="runs/r1/manifest.json")


def test_a_killed_rank_fails_the_run_quickly_with_one_line(tiny_model, sample_path, tmp_path):
    out = tmp_path / "out"
    args = ["train", "--config", "gemma-2b-it-lora", "--output", str(out), "--run-id", "r1",
            *_sets(tiny_model, sample_path, "training.max_steps=100000", "training.per_device_batch_size=2")]
    launcher = _launch(args)
    _wait_for_steps(launcher, out / "r1", 2)
    killed_at = time.monotonic()
    os.kill(_rank_pid(launcher, 1), signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=120)
    assert time.monotonic() - killed_at < 120
    assert launcher.returncode == 1
    assert "error: rank 1 was killed by signal SIGKILL first" in stderr
    assert "Traceback" not in stderr and not (out / "r1" / "manifest.json").exists()


@pytest.mark.parametrize(("codes", "expected"), [((75, 75), 75), ((0, 3), 3)])
def test_launcher_exits_with_the_code_of_the_rank_that_failed_first(tmp_path, codes, expected):
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, sys, time\n"
        f"codes = {codes!r}\n"
        "rank = int(os.environ['RANK'])\n"
        "if codes[rank] == 0:\n"
        "    time.sleep(60)  # stopped by the launcher once the other rank fails\n"
        "sys.exit(codes[rank])\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    done = subprocess.run(
        [*LAUNCH, str(script)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == expected and time.monotonic() - started < 50
    if expected != EXIT_PREEMPTED:
        assert "error: rank 1 exited with code 3 first" in done.stderr


def test_resume_refuses_a_checkpoint_written_by_another_number_of_processes(tmp_path, monkeypatch):
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    for rank in (0, 1):
        (checkpoint / f"rng_state_{rank}.pth").write_bytes(b"")
    cfg = load_config("gemma-2b-it-lora", [f"output.uri={tmp_path / 'out'}", "output.run_id=r1"], environ={})
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\), this run has 1"):
        plan_run(cfg, str(checkpoint), overwrite=False)
    monkeypatch.setenv("WORLD_SIZE", "2")  # the same number of processes: accepted
    assert plan_run(cfg, str(checkpoint), overwrite=False).checkpoint == str(checkpoint)
    # Rank 0's disk on one of two nodes: 2 RNG files, but its trainer state records the 4 processes
    (checkpoint / "trainer_state.json").write_text(json.dumps(
        {"global_step": 4, "stateful_callbacks": {"ProcessCount": {"args": {"world_size": 4}, "attributes": {}}}}))
    with pytest.raises(ConfigError, match=r"written by 4 process\(es\), this run has 2"):
        plan_run(cfg, str(checkpoint), overwrite=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert plan_run(cfg, str(checkpoint), overwrite=False).checkpoint == str(checkpoint)


def test_qlora_under_fsdp_trains_and_saves_the_whole_adapter(tiny_model, sample_path, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    args = ["train", "--config", "gemma-2b-it-qlora", "--output", str(out), "--run-id", "r1",
            *_sets(tiny_model, sample_path, "training.max_steps=3", "training.per_device_batch_size=2",
                   "training.distributed=fsdp", "training.learning_rate=1e-2")]
    launcher = _launch(args)
    _, stderr = launcher.communicate(timeout=400)
    assert launcher.returncode == 0, stderr[-3000:]
    assert "data parallel (fsdp, 2 processes)" in stderr
    losses = [entry["loss"] for entry in read_train_log(out / "r1")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    weights = load_file(out / "r1" / "adapter" / "adapter_model.safetensors")
    # gathered from both shards: full LoRA shapes (r=16 x hidden 64), not halves
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (16, 64)


def test_fsdp_stores_4bit_weights_in_the_compute_dtype():
    import torch

    from job.config import ModelConfig
    from job.train.model import quantization_config

    cfg = ModelConfig(dtype="bfloat16")
    assert quantization_config(cfg, sharded=True).bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config(cfg).bnb_4bit_quant_storage == torch.uint8  # FSDP could not shard this


@pytest.mark.parametrize("rank_1", ["saves", "hangs"])
def test_sigterm_to_the_launcher_exits_75_only_when_every_rank_saved(tmp_path, rank_1):
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "from job.train.preemption import report_stop\n"
        f"here, rank_1 = Path({str(tmp_path)!r}), {rank_1!r}\n"
        "def stop(*_):  # as the job does after its checkpoint\n"
        "    (here / ('stopped-' + os.environ['RANK'])).touch()\n"
        "    report_stop('stopped by SIGTERM at step 3; checkpoint saved')\n"
        "    sys.exit(75)\n"
        "if os.environ['RANK'] == '0' or rank_1 == 'saves':\n"
        "    signal.signal(signal.SIGTERM, stop)\n"
        "else:  # still in a step (or a slow upload) when torchrun's shutdown timeout runs out\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "(here / ('ready-' + os.environ['RANK'])).touch()\n"
        "time.sleep(60)\n"
    )
    launcher = subprocess.Popen(
        [*LAUNCH, "--shutdown-timeout", "3", str(script)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=60)
    if rank_1 == "saves":
        assert launcher.returncode == EXIT_PREEMPTED, stderr[-2000:]
        assert "every process stopped safely (stopped by SIGTERM at step 3; checkpoint saved) -> exit 75" in stderr
        assert sorted(path.name for path in tmp_path.glob("stopped-*")) == ["stopped-0", "stopped-1"]
    else:
        assert launcher.returncode == 1, stderr[-2000:]
        assert ("error: stopped by SIGTERM, but local rank(s) 1 of 2 did not save a checkpoint before torchrun "
                "stopped them (killed after its 3 s shutdown timeout") in stderr
        assert sorted(path.name for path in tmp_path.glob("stopped-*")) == ["stopped-0"]


def test_the_launcher_gives_the_ranks_longer_than_torchruns_30_s(monkeypatch):
    from torch.distributed.run import parse_args

    from job.platforms.launch import SHUTDOWN_TIMEOUT_S, _shutdown_timeout

    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.delenv("PET_SHUTDOWN_TIMEOUT", raising=False)
    args = parse_args(["worker.py"])
    assert args.shutdown_timeout is None  # torchrun alone would use 30 s
    assert _shutdown_timeout(args) == SHUTDOWN_TIMEOUT_S == args.shutdown_timeout > 30
    assert _shutdown_timeout(parse_args(["--shutdown-timeout", "90", "worker.py"])) == 90
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "100")
    assert _shutdown_timeout(parse_args(["worker.py"])) == 100


def test_evaluation_shares_are_whole_batches_dealt_round_robin(tiny_model, sample_path, monkeypatch):
    from transformers import AutoTokenizer

    from job.evaluation import sharding
    from job.train import distributed

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [json.loads(line) for line in sample_path.read_text().splitlines()[:5]]
    batches = sharding._batches(rows, tokenizer, batch_size=2)  # as one process batches them, longest first
    assert sorted(i for batch in batches for i in batch) == list(range(5)) and [len(b) for b in batches] == [2, 2, 1]
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    shares = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        shares[rank] = sharding.my_share(rows, tokenizer, batch_size=2)
    assert shares == {0: batches[0] + batches[2], 1: batches[1]}

    monkeypatch.setenv("RANK", "1")  # one row, two ranks: rank 1 has nothing to generate, and does not try
    monkeypatch.setattr(distributed, "gather_all", lambda pairs: [[(0, {"id": rows[0]["id"]})], pairs])
    calls = []
    assert sharding.generate_sharded(lambda share: calls.append(share) or [], rows[:1], tokenizer, 2) is None
    assert calls == []


def test_another_node_fetches_the_checkpoint_rank_0_resumes_from(tmp_path, monkeypatch, s3_bucket, s3_client):
    from job.train.distributed import ensure_checkpoint_here

    for name, body in (("adapter_model.safetensors", b"weights"), ("trainer_state.json", b"{}")):
        s3_client.put_object(Bucket=s3_bucket, Key=f"runs/r1/checkpoints/checkpoint-4/{name}", Body=body)
    # rank 0 fetched it into its own disk; this node (local rank 0 of node 1) has an empty run folder
    here = tmp_path / "node-1" / "r1" / "checkpoints" / "checkpoint-4"
    monkeypatch.setenv("RANK", "8")
    monkeypatch.setenv("LOCAL_RANK", "0")
    ensure_checkpoint_here(str(here), f"s3://{s3_bucket}/runs/r1/checkpoints")
    assert (here / "adapter_model.safetensors").read_bytes() == b"weights"
    ensure_checkpoint_here(str(here), f"s3://{s3_bucket}/runs/r1/missing")  # present now (a shared disk): no fetch
