#!/bin/sh
# Container entrypoint (ENTRYPOINT of docker/Dockerfile, CMD defaults to `run`).
#   train   -> SageMaker's training-container contract (SageMaker starts the image as `docker run IMAGE train`)
#   *       -> the finetune CLI: run, prepare, train, evaluate, score, presets, artifacts ...
# `exec` replaces this shell, so the Python process is PID 1 and receives SIGTERM from docker stop / the
# kubelet / SageMaker directly: it saves a checkpoint and exits 75 (safe to retry with --resume auto).
set -eu

if [ "${1:-}" = "train" ]; then
    exec python -m job.platforms.sagemaker
fi
exec finetune "$@"
