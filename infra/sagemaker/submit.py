"""Submit the fine-tuning image as a SageMaker training job: managed spot, resumable from checkpoints.

Builds the CreateTrainingJob request itself (boto3 only, no SageMaker SDK) and sends it, or prints it with
--dry-run (nothing is sent; no AWS credentials needed). The image must be the `--target sagemaker` build in
ECR (`make push`), the role a SageMaker execution role that can read the image and write the bucket.

    python infra/sagemaker/submit.py \\
        --image 123456789012.dkr.ecr.us-east-1.amazonaws.com/finetune-job:0.1.0-sagemaker \\
        --role arn:aws:iam::123456789012:role/SageMakerExecutionRole --bucket my-bucket [--dry-run]

Outputs: s3://BUCKET/finetune/sagemaker-output/<job>/output/model.tar.gz (adapter, reports, manifest; fetch
with `finetune artifacts pull`). Checkpoints: s3://BUCKET/finetune/checkpoints/<job>/, synced with
/opt/ml/checkpoints and restored when a spot interruption restarts the job, or when SageMaker retries the job
after an internal error (RetryStrategy, --max-retries).

HF_TOKEN: `--hf-token-secret ARN` passes only the Secrets Manager secret's ARN; the container reads the token
with the job's role (which needs secretsmanager:GetSecretValue on it), so DescribeTrainingJob never shows it.
Without it, an HF_TOKEN in this environment is passed in the request's Environment, which DescribeTrainingJob
shows (a warning says so).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import datetime, timezone
from typing import Any

JOB_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/\S+")
SECRET_ARN = re.compile(r"arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:\S+")
HF_TOKEN_SECRET_ENV = "FINETUNE_HF_TOKEN_SECRET"
"""Read by the container (job/platforms/sagemaker.py), which puts the secret's value in HF_TOKEN."""
MAX_RETRIES = 2
METRICS = [  # parsed by SageMaker from the job's log lines (CloudWatch metrics)
    {"Name": "train:loss", "Regex": r"step \d+/\d+  loss ([0-9.eE+-]+)"},
    {"Name": "train:tokens_per_s", "Regex": r"lr \S+  ([0-9.]+) tok/s"},
]


def build_request(
    *,
    image: str,
    role: str,
    bucket: str,
    job_name: str,
    config: str = "gemma-2b-it-qlora",
    hyperparameters: dict[str, Any] | None = None,
    instance_type: str = "ml.g5.2xlarge",
    instance_count: int = 1,
    train_data: str | None = None,
    max_run_s: int = 24 * 3600,
    max_wait_s: int = 36 * 3600,
    environment: dict[str, str] | None = None,
    hf_token_secret: str | None = None,
    max_retries: int = MAX_RETRIES,
) -> dict[str, Any]:
    """The CreateTrainingJob request. Hyperparameters go as strings (SageMaker's type for them): `config`
    picks the preset, `section.key` overrides one field. `hf_token_secret` (a Secrets Manager ARN) is passed
    instead of a token; `max_retries` (0-30) is the RetryStrategy: how often SageMaker restarts the job after an
    internal error, from the synced checkpoints."""
    if not JOB_NAME.fullmatch(job_name):
        raise ValueError(f"job name {job_name!r}: 1-63 letters, digits and '-', starting with a letter or digit")
    if not ROLE_ARN.fullmatch(role):
        raise ValueError(f"role {role!r}: expected an IAM role ARN, arn:aws:iam::<account>:role/<name>")
    if max_wait_s < max_run_s:
        raise ValueError("max_wait_s must be at least max_run_s (it includes waiting for spot capacity)")
    if hf_token_secret is not None and not SECRET_ARN.fullmatch(hf_token_secret):
        raise ValueError(f"--hf-token-secret {hf_token_secret!r}: expected a Secrets Manager secret ARN, "
                         "arn:aws:secretsmanager:<region>:<account>:secret:<name>")
    if not 0 <= max_retries <= 30:
        raise ValueError(f"--max-retries {max_retries}: SageMaker allows 0 to 30")
    prefix = f"s3://{bucket}/finetune"
    request: dict[str, Any] = {
        "TrainingJobName": job_name,
        "RoleArn": role,
        "AlgorithmSpecification": {"TrainingImage": image, "TrainingInputMode": "File",
                                   "MetricDefinitions": METRICS},
        "HyperParameters": {key: str(value) for key, value in {"config": config, **(hyperparameters or {})}.items()},
        "OutputDataConfig": {"S3OutputPath": f"{prefix}/sagemaker-output"},
        "ResourceConfig": {"InstanceType": instance_type, "InstanceCount": instance_count, "VolumeSizeInGB": 100},
        "StoppingCondition": {"MaxRuntimeInSeconds": max_run_s, "MaxWaitTimeInSeconds": max_wait_s},
        "EnableManagedSpotTraining": True,
        "CheckpointConfig": {"S3Uri": f"{prefix}/checkpoints/{job_name}", "LocalPath": "/opt/ml/checkpoints"},
    }
    if train_data:
        request["InputDataConfig"] = [{
            "ChannelName": "train",
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": train_data,
                                            "S3DataDistributionType": "FullyReplicated"}},
        }]
    if max_retries:
        request["RetryStrategy"] = {"MaximumRetryAttempts": max_retries}
    environment = {**(environment or {}), **({HF_TOKEN_SECRET_ENV: hf_token_secret} if hf_token_secret else {})}
    if environment:
        # Shown by DescribeTrainingJob like hyperparameters: never a token when a secret is given.
        request["Environment"] = environment
    return request


def redacted(request: dict[str, Any]) -> dict[str, Any]:
    """The request with environment values hidden, for printing (the secret's ARN is not a secret)."""
    shown = json.loads(json.dumps(request))
    for name in shown.get("Environment", {}):
        if name != HF_TOKEN_SECRET_ENV:
            shown["Environment"][name] = "***"
    return shown


def _set(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or "." not in key:
        raise argparse.ArgumentTypeError(f"{item!r}: expected section.key=value")
    return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="ECR image URI (the --target sagemaker build)")
    parser.add_argument("--role", required=True, help="SageMaker execution role ARN")
    parser.add_argument("--bucket", required=True, help="S3 bucket for outputs and checkpoints")
    parser.add_argument("--config", default="gemma-2b-it-qlora", help="preset name")
    parser.add_argument("--set", dest="sets", type=_set, action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one field (repeatable), e.g. --set training.max_steps=500")
    parser.add_argument("--instance-type", default="ml.g5.2xlarge", help="e.g. ml.g5.12xlarge (4 GPUs)")
    parser.add_argument("--instance-count", type=int, default=1, help="hosts; torchrun spans all of them")
    parser.add_argument("--train-data", help="s3:// prefix of .jsonl/.parquet files (channel 'train')")
    parser.add_argument("--job-name", help="default: finetune-<UTC timestamp>")
    parser.add_argument("--hf-token-secret", metavar="ARN",
                        help="Secrets Manager secret holding HF_TOKEN (the token, or JSON with an HF_TOKEN key); "
                             "read in the container, never sent in the request")
    parser.add_argument("--max-retries", type=int, default=MAX_RETRIES,
                        help=f"RetryStrategy: restarts after an internal error, 0-30 (default {MAX_RETRIES})")
    parser.add_argument("--dry-run", action="store_true", help="print the request instead of sending it")
    args = parser.parse_args(argv)

    job_name = args.job_name or f"finetune-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    environment = {}
    if os.environ.get("HF_TOKEN") and not args.hf_token_secret:
        environment["HF_TOKEN"] = os.environ["HF_TOKEN"]
        print("warning: HF_TOKEN goes in the request's Environment, which DescribeTrainingJob shows; "
              "pass --hf-token-secret ARN to keep it in Secrets Manager", file=sys.stderr)
    try:
        request = build_request(
            image=args.image, role=args.role, bucket=args.bucket, job_name=job_name, config=args.config,
            hyperparameters=dict(args.sets), instance_type=args.instance_type,
            instance_count=args.instance_count, train_data=args.train_data, environment=environment,
            hf_token_secret=args.hf_token_secret, max_retries=args.max_retries,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(redacted(request), indent=2))
        return 0
    import boto3  # sends the request: needs AWS credentials and sagemaker:CreateTrainingJob

    response = boto3.client("sagemaker").create_training_job(**request)
    print(f"submitted {job_name}: {response['TrainingJobArn']}")
    print(f"watch:  aws logs tail /aws/sagemaker/TrainingJobs --log-stream-name-prefix {job_name} --follow")
    output = f"s3://{args.bucket}/finetune/sagemaker-output/{job_name}/output"
    print(f"fetch:  finetune artifacts pull {output} runs/{job_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
