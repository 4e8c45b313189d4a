"""Render a kustomize overlay with this submission's image, bucket and run id: `make k8s-submit` / `k8s-render`.

    python infra/k8s/render.py multi-node --image REGISTRY/finetune-job:0.1.0 --bucket my-bucket --run-id exp-7

Writes a throwaway kustomization on top of `infra/k8s/overlays/<overlay>` (kustomize's `images`, a merge of
the finetune-params ConfigMap, patches renaming the Job, and for multi-node its Service and subdomain, to the
run id, and the label `app.kubernetes.io/instance: <run id>` on every object, by which `submit.py` and `make
k8s-delete` find them) and prints `kubectl kustomize` of it. Needs kubectl (its built-in kustomize); runs offline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

OVERLAYS = Path(__file__).resolve().parent / "overlays"
BASE_IMAGE = "registry.example.com/finetune-job"
INSTANCE_LABEL = "app.kubernetes.io/instance"
"""On every object of one submission, valued with its run id."""
"""The image the base kustomization sets (its `images` entry); this replaces it."""
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?")
"""A run id usable as Job name, Service name and DNS label (Indexed Job pod hostnames add `-<index>`)."""


def _fail(message: str) -> None:
    """A usage error: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _image(ref: str) -> dict[str, str]:
    name, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "")
    return {"name": BASE_IMAGE, "newName": name, **({"newTag": tag} if tag else {})}


def kustomization(overlay: str, image: str, bucket: str, run_id: str, root: Path, prefix: str = "finetune") -> dict:
    """The throwaway kustomization (as data) for one submission, to be written into folder `root`."""
    if not (OVERLAYS / overlay / "kustomization.yaml").is_file():
        _fail(f"unknown overlay {overlay!r}; choose one of: "
                         f"{', '.join(sorted(p.name for p in OVERLAYS.iterdir()))}")
    if not _NAME.fullmatch(run_id):
        _fail(f"run id {run_id!r}: use 1-52 lowercase letters, digits and '-'")
    if not bucket or "/" in bucket:
        _fail(f"bucket {bucket!r}: give the bucket name alone")
    rename = [{"op": "replace", "path": "/metadata/name", "value": run_id}]
    patches = [{"target": {"kind": "Job"}, "patch": json.dumps(rename)}]
    if overlay == "multi-node":
        patches[0]["patch"] = json.dumps(
            [*rename, {"op": "replace", "path": "/spec/template/spec/subdomain", "value": run_id}]
        )
        patches.append({"target": {"kind": "Service"}, "patch": json.dumps(
            [*rename, {"op": "replace", "path": "/spec/selector/batch.kubernetes.io~1job-name", "value": run_id}]
        )})
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(OVERLAYS / overlay, root)],  # kustomize wants relative paths
        "labels": [{"pairs": {INSTANCE_LABEL: run_id}, "includeSelectors": False, "includeTemplates": True}],
        "images": [_image(image)],
        "configMapGenerator": [{
            "name": "finetune-params",
            "behavior": "merge",
            "literals": [f"FINETUNE_OUTPUT_URI=s3://{bucket}/{prefix.strip('/')}/runs"],
        }],
        "patches": patches,
    }


def render(overlay: str, image: str, bucket: str, run_id: str) -> str:
    """`kubectl kustomize` of the submission: multi-document YAML, ready for `kubectl apply -f -`."""
    with tempfile.TemporaryDirectory(prefix="finetune-k8s-") as tmp:
        data = kustomization(overlay, image, bucket, run_id, Path(tmp))
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        result = subprocess.run(["kubectl", "kustomize", tmp], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"error: kubectl kustomize failed: {result.stderr.strip()}", file=sys.stderr)
        raise SystemExit(1)
    return result.stdout


def argument_parser(description: str) -> argparse.ArgumentParser:
    """The options naming what to render (shared with submit.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("overlay", help="single-gpu, multi-gpu or multi-node")
    parser.add_argument("--image", required=True, help="image reference, REGISTRY/NAME:TAG")
    parser.add_argument("--bucket", required=True, help="S3 bucket; runs go to s3://BUCKET/finetune/runs/<run id>")
    parser.add_argument("--run-id", required=True, help="run id = Job name (resubmitting a failed one resumes it)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = argument_parser(__doc__.splitlines()[0]).parse_args(argv)
    sys.stdout.write(render(args.overlay, args.image, args.bucket, args.run_id))


if __name__ == "__main__":
    main()
