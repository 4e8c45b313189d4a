#!/bin/sh
# Container entrypoint (ENTRYPOINT of docker/Dockerfile, CMD defaults to `run`).
#   train            -> SageMaker's training-container contract: SageMaker starts the image as
#                       `docker run IMAGE train`, with no other argument (job/platforms/sagemaker.py)
#   train ARGS...    -> `finetune train ARGS...` (e.g. `docker run IMAGE train --config gemma-2b-it-qlora`)
#   launch ARGS...   -> `python -m job.platforms.launch ARGS...`: torchrun keeping the job's exit codes, e.g.
#                       `launch --nproc-per-node=4 -m job run --config gemma-2b-it-lora` (Kubernetes args)
#   anything else    -> the finetune CLI: run, prepare, evaluate, score, presets, artifacts ...
# `exec` replaces this shell, so the job is the direct child of the init process (tini, PID 1), which passes
# SIGTERM from docker stop / the kubelet / SageMaker on: the job saves a checkpoint and exits 75.
set -eu

if [ "$#" -eq 1 ] && [ "$1" = "train" ]; then
    exec python -m job.platforms.sagemaker
fi
if [ "$#" -ge 1 ] && [ "$1" = "launch" ]; then
    shift
    exec python -m job.platforms.launch "$@"
fi
exec finetune "$@"
