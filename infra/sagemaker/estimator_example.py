"""Launch the fine-tuning image as a SageMaker training job (managed spot, resumable from checkpoints).

Needs the SageMaker Python SDK v2 (`pip install "sagemaker>=2.200,<3"`; v3 replaced `Estimator` with
`ModelTrainer`), AWS credentials, the image pushed to ECR (built with `--target sagemaker`, see
infra/README.md) and an execution role. Usage:

    HF_TOKEN=hf_... python infra/sagemaker/estimator_example.py \
        --image 123456789012.dkr.ecr.us-east-1.amazonaws.com/finetune-job:0.1.0-sagemaker \
        --role arn:aws:iam::123456789012:role/SageMakerExecutionRole --bucket my-bucket
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="ECR image URI")
    parser.add_argument("--role", required=True, help="SageMaker execution role ARN")
    parser.add_argument("--bucket", required=True, help="S3 bucket for outputs and checkpoints")
    parser.add_argument("--config", default="gemma-2b-it-qlora", help="preset name")
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--train-data", help="s3:// prefix of .jsonl/.parquet files (channel 'train')")
    args = parser.parse_args()

    from sagemaker.estimator import Estimator  # imported here: the SDK is not a dependency of the job

    prefix = f"s3://{args.bucket}/finetune"
    estimator = Estimator(
        image_uri=args.image,
        role=args.role,
        instance_count=1,
        instance_type="ml.g5.2xlarge",  # 1x A10G 24 GB
        volume_size=100,
        max_run=24 * 3600,
        use_spot_instances=True,
        max_wait=36 * 3600,  # >= max_run: time allowed for waiting on spot capacity too
        checkpoint_s3_uri=f"{prefix}/checkpoints",  # synced with /opt/ml/checkpoints, restored on restart
        output_path=f"{prefix}/sagemaker-output",  # /opt/ml/model is uploaded here as model.tar.gz
        base_job_name="finetune-gemma",
        # All values are sent as strings: `config` picks the preset, `section.key` overrides one field.
        hyperparameters={"config": args.config, "training.max_steps": args.max_steps},
        # Gemma is gated. Environment values are shown by DescribeTrainingJob, like hyperparameters: use a
        # token scoped to read access (or fetch it from Secrets Manager in your own wrapper).
        environment={"HF_TOKEN": os.environ["HF_TOKEN"]},
    )
    estimator.fit(inputs={"train": args.train_data} if args.train_data else None, wait=True)
    print("model artifacts:", estimator.model_data)


if __name__ == "__main__":
    main()
