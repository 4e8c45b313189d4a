"""Submit a rendered overlay for one run id: `make k8s-submit`. Resubmitting the run id of a failed Job resumes it.

    python infra/k8s/submit.py multi-node --image REGISTRY/finetune-job:0.1.0 --bucket my-bucket --run-id exp-7

A Job's pod template cannot change and a finished Job never runs again, so `kubectl apply` of the same Job is
rejected or does nothing. This looks at the Job named like the run id first:
- none: the rendered objects are applied;
- failed (its retries or deadline used up, or exit 2/3): it is deleted with its pods, Service and ConfigMap
  (found by the `app.kubernetes.io/instance` label render.py sets), then the new one is applied; the job resumes
  from the checkpoints in the bucket (`--resume auto`);
- still running, or complete (its run is published): nothing is changed, exit 2 with one line saying what to do.
"""

from __future__ import annotations

import json
import subprocess
import sys

from render import INSTANCE_LABEL, argument_parser, render


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _kubectl(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"error: kubectl {' '.join(args[:2])} failed: {result.stderr.strip()}", file=sys.stderr)
        raise SystemExit(1)
    return result.stdout


def job_state(job: dict | None) -> str:
    """`absent`, `running`, `complete` or `failed` for a Job (as `kubectl get -o json` shows it, or None)."""
    if job is None:
        return "absent"
    conditions = {c.get("type"): c.get("status") for c in job.get("status", {}).get("conditions", [])}
    if conditions.get("Complete") == "True":
        return "complete"
    if conditions.get("Failed") == "True":
        return "failed"
    return "running"


def submit(overlay: str, image: str, bucket: str, run_id: str, namespace: str) -> None:
    manifest = render(overlay, image, bucket, run_id)
    found = _kubectl("get", "job", run_id, "-n", namespace, "-o", "json", "--ignore-not-found").strip()
    state = job_state(json.loads(found) if found else None)
    if state == "running":
        _fail(f"job {run_id} in namespace {namespace} is still running: follow it with `make k8s-logs "
              f"RUN_ID={run_id}`, or stop it with `make k8s-delete RUN_ID={run_id}` (the bucket keeps its checkpoints) "
              "and submit again to resume")
    if state == "complete":
        _fail(f"job {run_id} in namespace {namespace} completed and its run is published; submit another RUN_ID "
              f"to train again (`make k8s-delete RUN_ID={run_id}` removes the finished job)")
    if state == "failed":
        print(f"job {run_id} failed earlier: deleting it (pods, Service, ConfigMap), then submitting it again; "
              "it resumes from its checkpoints", file=sys.stderr)
        _kubectl("delete", "-n", namespace, "--ignore-not-found", "--cascade=foreground", "--wait",
                 f"job/{run_id}", f"service/{run_id}")
        _kubectl("delete", "-n", namespace, "--ignore-not-found", "--wait", "configmap", "-l",
                 f"{INSTANCE_LABEL}={run_id}")
    sys.stdout.write(_kubectl("apply", "-n", namespace, "-f", "-", stdin=manifest))


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--namespace", default="default", help="Kubernetes namespace")
    args = parser.parse_args(argv)
    submit(args.overlay, args.image, args.bucket, args.run_id, args.namespace)


if __name__ == "__main__":
    main()
