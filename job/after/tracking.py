"""Eval metrics into the experiment tracker's run that transformers' integration opened for training.

Training logs through transformers' own callbacks (`training.report_to`; the run id is the tracker's run name, and
for W&B also its run id). Evaluation happens after the trainer closed that run, so its headline numbers are added
here, to the same run, at the end. Tracker settings and credentials come only from the environment
(MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, WANDB_PROJECT, WANDB_API_KEY ...); nothing here logs or stores them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def eval_scalars(metrics: dict[str, dict[str, Any]]) -> dict[str, float]:
    """`eval/<model>/<metric>` for every numeric top-level metric of each evaluated model (base, tuned)."""
    scalars = {}
    for label, values in metrics.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                scalars[f"eval/{label}/{key}"] = float(value)
    return scalars


def log_eval_metrics(report_to: str, run_name: str, metrics: dict[str, dict[str, Any]] | None) -> None:
    """Add the evaluation's metrics to the tracker run named `run_name` (mlflow, wandb; no-op otherwise)."""
    scalars = eval_scalars(metrics or {})
    if not scalars:
        return
    if report_to == "mlflow":
        _mlflow(run_name, scalars)
    elif report_to == "wandb":
        _wandb(run_name, scalars)


def _mlflow(run_name: str, scalars: dict[str, float]) -> None:
    import mlflow

    if os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    found = mlflow.search_runs(
        experiment_names=[experiment] if experiment else None, search_all_experiments=not experiment,
        filter_string=f"attributes.run_name = '{run_name}'", order_by=["attributes.start_time DESC"],
        max_results=1, output_format="list",
    )
    if not found:
        log.warning("mlflow: no run named %s; eval metrics not logged there", run_name)
        return
    with mlflow.start_run(run_id=found[0].info.run_id):
        mlflow.log_metrics(scalars)


def _wandb(run_name: str, scalars: dict[str, float]) -> None:
    import wandb

    from job.train.trainer import tracker_run_id

    run_id = tracker_run_id(run_name)
    run = wandb.run  # transformers' WandbCallback leaves the training run open in this process
    if run is None or run.id != run_id:
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "huggingface"), id=run_id, name=run_name,
                         resume="allow")
    run.summary.update(scalars)
    run.finish()
