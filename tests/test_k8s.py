"""Kubernetes: every kustomize overlay renders (kubectl's built-in kustomize, offline) and validates strictly,
core kinds with kubernetes-validate and the operators' custom kinds against their CRD schemas; the failure
policy, GPU scheduling, optional secrets and the multi-node rendezvous say what the README promises."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "infra" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
OPERATORS = sorted((K8S / "operators").glob("*.yaml"))
SCHEMAS = REPO / "infra" / "schemas"
CUSTOM_KINDS = {
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainjob-v1alpha1.json",
    ("kubeflow.org/v1", "PyTorchJob"): "pytorchjob-v1.json",
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): "jobset-v1alpha2.json",
}
K8S_VERSIONS = ("1.31.0", "latest")  # oldest with podFailurePolicy GA, and the newest schemas shipped

pytestmark = pytest.mark.timeout(120)


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl (with its built-in kustomize) is needed to render the overlays in CI")
        pytest.skip("kubectl not installed")
    return kubectl


def _render(overlay: str) -> list[dict]:
    out = subprocess.run([_kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def strict(schema: object) -> object:
    """Close every object schema that lists its properties and does not preserve unknown fields (as the
    README in infra/schemas/ describes), so unknown or misspelled fields fail validation."""
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for key, sub in list(schema.items()):
            if key == "properties":
                for item in sub.values():
                    strict(item)
            elif key in ("items", "additionalProperties"):
                strict(sub)
            elif key in ("allOf", "anyOf", "oneOf"):
                for item in sub:
                    strict(item)
    return schema


def _custom_schema(doc: dict) -> dict:
    name = CUSTOM_KINDS[(doc["apiVersion"], doc["kind"])]
    return strict(json.loads((SCHEMAS / name).read_text()))


def _validate_core(doc: dict, version: str) -> None:
    from kubernetes_validate import utils

    utils.validate(doc, utils.latest_version() if version == "latest" else version, strict=True)


def test_schemas_match_the_shared_copies():
    shared = REPO.parent / "shared" / "schemas"
    if not shared.is_dir():
        if os.environ.get("CI"):
            pytest.fail("CI runs with shared/ beside the repository: its schemas must match infra/schemas")
        pytest.skip("no shared/ beside the repository")
    for name in CUSTOM_KINDS.values():
        assert json.loads((SCHEMAS / name).read_text()) == json.loads((shared / name).read_text()), name


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay: str, version: str):
    docs = _render(overlay)
    assert {doc["kind"] for doc in docs} >= {"Job", "ConfigMap"}
    for doc in docs:
        _validate_core(doc, version)


@pytest.mark.parametrize("path", [K8S / "secret-example.yaml"], ids=lambda p: p.name)
def test_secret_example_validates(path: Path):
    (secret,) = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    _validate_core(secret, "latest")
    assert all("REPLACE_ME" in value for value in secret["stringData"].values())
    assert set(secret["stringData"]) == {"HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


@pytest.mark.parametrize("path", OPERATORS, ids=lambda p: p.name)
def test_operator_manifest_validates_against_its_crd_schema(path: Path):
    (doc,) = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    jsonschema.validate(doc, _custom_schema(doc))


def test_strict_schema_rejects_a_misspelled_field():
    doc = yaml.safe_load((K8S / "operators" / "trainjob.yaml").read_text())
    bad = copy.deepcopy(doc)
    bad["spec"]["trainer"]["numNode"] = bad["spec"]["trainer"].pop("numNodes")
    schema = _custom_schema(doc)
    jsonschema.validate(doc, schema)
    with pytest.raises(jsonschema.ValidationError, match="numNode"):
        jsonschema.validate(bad, schema)


def test_every_custom_kind_has_a_manifest():
    kinds = {(d["apiVersion"], d["kind"]) for p in OPERATORS for d in yaml.safe_load_all(p.read_text()) if d}
    assert kinds == set(CUSTOM_KINDS)
    trainjob = yaml.safe_load((K8S / "operators" / "trainjob.yaml").read_text())
    assert trainjob["spec"]["runtimeRef"]["name"] == "torch-distributed"


def _policy(job_spec: dict) -> tuple[dict[int, str], dict[str, str]]:
    container = job_spec["template"]["spec"]["containers"][0]["name"]
    codes: dict[int, str] = {}
    conditions: dict[str, str] = {}
    for rule in job_spec["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            assert rule["onExitCodes"]["operator"] == "In"
            assert rule["onExitCodes"]["containerName"] == container
            codes.update(dict.fromkeys(rule["onExitCodes"]["values"], rule["action"]))
        for condition in rule.get("onPodConditions", []):
            conditions[condition["type"]] = rule["action"]
    return codes, conditions


def _job_specs() -> list[tuple[str, dict]]:
    specs = [(overlay, _by_kind(_render(overlay), "Job")[0]["spec"]) for overlay in OVERLAYS]
    jobset = yaml.safe_load((K8S / "operators" / "jobset.yaml").read_text())
    specs += [("jobset", job["template"]["spec"]) for job in jobset["spec"]["replicatedJobs"]]
    return specs


def test_every_job_keeps_the_exit_code_semantics_and_schedules_on_gpu_nodes():
    for name, spec in _job_specs():
        assert _policy(spec) == ({2: "FailJob", 3: "FailJob", 75: "Ignore"}, {"DisruptionTarget": "Ignore"}), name
        pod = spec["template"]["spec"]
        assert pod["restartPolicy"] == "Never", name
        assert pod["terminationGracePeriodSeconds"] >= 120, name
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"], name
        assert pod["nodeSelector"], name
        container = pod["containers"][0]
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert "command" not in container, f"{name}: command would replace the image's tini + entrypoint"
        if gpus > 1:  # torchrun through the launcher that keeps exit codes 2/3/75, via the image's entrypoint
            assert container["args"][0] == "launch", name
            assert f"--nproc-per-node={gpus}" in container["args"], name
            assert pod["terminationGracePeriodSeconds"] >= _shutdown_timeout(container["args"]) + 30, name


def _shutdown_timeout(args: list[str]) -> int:
    """torchrun's `--shutdown-timeout=N` in a launcher's arguments, else the launcher's default."""
    from job.platforms.launch import SHUTDOWN_TIMEOUT_S

    given = [int(arg.split("=", 1)[1]) for arg in args if arg.startswith("--shutdown-timeout=")]
    return given[0] if given else SHUTDOWN_TIMEOUT_S


def _image_entrypoint() -> list[str]:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    return json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.MULTILINE).group(1))


def test_multi_gpu_pods_keep_the_image_entrypoint():
    pods = [_by_kind(_render(overlay), "Job")[0]["spec"]["template"]["spec"] for overlay in ("multi-gpu", "multi-node")]
    pytorchjob = yaml.safe_load((K8S / "operators" / "pytorchjob.yaml").read_text())
    pods += [spec["template"]["spec"] for spec in pytorchjob["spec"]["pytorchReplicaSpecs"].values()]
    for pod in pods:
        container = pod["containers"][0]
        assert "command" not in container and container["args"][0] == "launch"
        assert container["args"][container["args"].index("-m") + 1:][:2] == ["job", "run"]
        assert pod["terminationGracePeriodSeconds"] >= _shutdown_timeout(container["args"]) + 30
    entrypoint = (REPO / "docker" / "entrypoint.sh").read_text()
    assert 'exec python -m job.platforms.launch "$@"' in entrypoint


def test_trainjob_patches_the_runtime_pods_so_they_can_checkpoint():
    doc = yaml.safe_load((K8S / "operators" / "trainjob.yaml").read_text())
    trainer = doc["spec"]["trainer"]
    # the runtime's container has its own command: the TrainJob sets the image's entrypoint back
    assert trainer["command"] == _image_entrypoint() and trainer["args"][0] == "launch"
    (patch,) = doc["spec"]["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == "node"  # the torch-distributed runtime's replicated job and container
    pod = job["template"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= _shutdown_timeout(trainer["args"]) + 30
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1001
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    (container,) = pod["containers"]
    assert container["name"] == "node" and container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes[mounts["/cache"]]
    # closed schema: a misspelled field deep inside the patch is rejected
    bad = copy.deepcopy(doc)
    bad_pod = bad["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    bad_pod["template"]["spec"]["template"]["spec"]["terminationGracePeriod"] = 180
    with pytest.raises(jsonschema.ValidationError, match="terminationGracePeriod"):
        jsonschema.validate(bad, _custom_schema(bad))


def test_single_gpu_job_reads_optional_secrets_and_params_with_envfrom():
    docs = _render("single-gpu")
    (job,) = _by_kind(docs, "Job")
    (config_map,) = _by_kind(docs, "ConfigMap")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["run", "--config", "gemma-2b-it-qlora", "--resume", "auto"]
    sources = {next(iter(k for k in s if k != "prefix")): s for s in container["envFrom"]}
    secret = sources["secretRef"]["secretRef"]
    assert secret == {"name": "finetune-credentials", "optional": True}, "a missing Secret must not block the pod"
    assert sources["configMapRef"]["configMapRef"]["name"] == config_map["metadata"]["name"]
    assert config_map["data"]["FINETUNE_OUTPUT_URI"].startswith("s3://")
    env = {item["name"]: item for item in container["env"]}
    assert "fieldRef" in env["FINETUNE_OUTPUT_RUN_ID"]["valueFrom"], "retried pods must share the run id"
    assert not any("secretKeyRef" in item.get("valueFrom", {}) for item in container["env"])


def test_multi_node_indexed_job_rendezvous_on_pod_zero():
    docs = _render("multi-node")
    (job,) = _by_kind(docs, "Job")
    (service,) = _by_kind(docs, "Service")
    spec = job["spec"]
    name = job["metadata"]["name"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == name
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    command = pod["containers"][0]["args"]
    assert "--nnodes=2" in command and "--node-rank=$(JOB_COMPLETION_INDEX)" in command
    assert "--rdzv-backend=c10d" in command
    # pod 0's DNS name: <job>-0.<service>, with the run id (= the Job's name) expanded by the kubelet
    assert "--rdzv-endpoint=$(FINETUNE_OUTPUT_RUN_ID)-0.$(FINETUNE_OUTPUT_RUN_ID):29500" in command
    env = {item["name"]: item for item in pod["containers"][0]["env"]}
    assert "job-completion-index" in env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    run_id_source = env["FINETUNE_OUTPUT_RUN_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert run_id_source == "metadata.labels['batch.kubernetes.io/job-name']"


def test_render_sets_image_bucket_and_run_id(tmp_path: Path):
    _kubectl()
    result = subprocess.run(
        [sys.executable, str(K8S / "render.py"), "multi-node", "--image", "ghcr.io/acme/finetune-job:1.2.3",
         "--bucket", "acme-ml", "--run-id", "exp-7"], capture_output=True, text=True, timeout=60, check=True)
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    (job,) = _by_kind(docs, "Job")
    (service,) = _by_kind(docs, "Service")
    (config_map,) = _by_kind(docs, "ConfigMap")
    pod = job["spec"]["template"]["spec"]
    assert job["metadata"]["name"] == service["metadata"]["name"] == pod["subdomain"] == "exp-7"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": "exp-7"}
    assert pod["containers"][0]["image"] == "ghcr.io/acme/finetune-job:1.2.3"
    assert config_map["data"]["FINETUNE_OUTPUT_URI"] == "s3://acme-ml/finetune/runs"
    for doc in docs:
        _validate_core(doc, "latest")
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "exp-7"  # what submit/delete select
    assert pod["containers"][0]["envFrom"][0]["configMapRef"]["name"] == config_map["metadata"]["name"]


@pytest.fixture
def fake_kubectl(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """`kubectl` first on PATH: `kustomize` runs the real one; `get job` prints `job.json` (if any); every other
    call is recorded in `calls` (stdin of `apply` in `applied.yaml`)."""
    real = _kubectl()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = kustomize ]; then exec {real} "$@"; fi\n'
        f'echo "$*" >> {tmp_path}/calls\n'
        f'if [ "$1" = get ]; then cat {tmp_path}/job.json 2>/dev/null; exit 0; fi\n'
        f'if [ "$1" = apply ]; then cat > {tmp_path}/applied.yaml; echo "job.batch/exp-7 created"; fi\n'
    )
    (bin_dir / "kubectl").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, tmp_path


def _submit(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(K8S / "submit.py"), "multi-node", "--image", "ghcr.io/acme/finetune-job:1.2.3",
         "--bucket", "acme-ml", "--run-id", "exp-7", "--namespace", "ml"],
        capture_output=True, text=True, timeout=60, env=env)


def _job_status(*conditions: str) -> str:
    return json.dumps({"kind": "Job", "metadata": {"name": "exp-7"},
                       "status": {"conditions": [{"type": c, "status": "True"} for c in conditions]}})


def test_submit_applies_a_new_run_id(fake_kubectl):
    env, here = fake_kubectl
    result = _submit(env)
    assert result.returncode == 0, result.stderr
    calls = (here / "calls").read_text().splitlines()
    assert calls == ["get job exp-7 -n ml -o json --ignore-not-found", "apply -n ml -f -"]
    applied = [doc for doc in yaml.safe_load_all((here / "applied.yaml").read_text()) if doc]
    assert {doc["kind"] for doc in applied} == {"Job", "Service", "ConfigMap"}


def test_submit_replaces_a_failed_job_so_that_it_resumes(fake_kubectl):
    env, here = fake_kubectl
    (here / "job.json").write_text(_job_status("FailureTarget", "Failed"))
    result = _submit(env)
    assert result.returncode == 0, result.stderr
    assert "deleting it (pods, Service, ConfigMap), then submitting it again" in result.stderr
    assert (here / "calls").read_text().splitlines() == [
        "get job exp-7 -n ml -o json --ignore-not-found",
        "delete -n ml --ignore-not-found --cascade=foreground --wait job/exp-7 service/exp-7",
        "delete -n ml --ignore-not-found --wait configmap -l app.kubernetes.io/instance=exp-7",
        "apply -n ml -f -",
    ]


@pytest.mark.parametrize(("conditions", "message"), [
    ((), "is still running"), (("SuccessCriteriaMet", "Complete"), "completed and its run is published"),
])
def test_submit_leaves_a_running_or_complete_job_alone(fake_kubectl, conditions, message):
    env, here = fake_kubectl
    (here / "job.json").write_text(_job_status(*conditions))
    result = _submit(env)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert (here / "calls").read_text().splitlines() == ["get job exp-7 -n ml -o json --ignore-not-found"]


@pytest.mark.parametrize(("args", "message"), [
    (["nope", "--image", "x:1", "--bucket", "b", "--run-id", "r"], "unknown overlay"),
    (["single-gpu", "--image", "x:1", "--bucket", "b", "--run-id", "Exp_7"], "run id"),
    (["single-gpu", "--image", "x:1", "--bucket", "b/prefix", "--run-id", "r"], "bucket"),
])
def test_render_rejects_bad_input_with_exit_2(args: list[str], message: str):
    result = subprocess.run([sys.executable, str(K8S / "render.py"), *args], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
