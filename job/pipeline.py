"""A whole run, top to bottom: run folder -> data -> train -> evaluate -> publish (manifest last)."""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone
from typing import Any

from job.config import JobConfig
from job.storage.objects import is_remote


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_pipeline(cfg: JobConfig, *, resume: str, overwrite: bool, evaluate: bool) -> dict[str, Any]:
    """Train (and evaluate) one run, then publish it to `<output.uri>/<run_id>/`. Returns the run's summary.

    SIGTERM during training saves a checkpoint first; anywhere else it stops at once; both exit with 75.
    """
    from job.train.preemption import stop_on_sigterm

    with stop_on_sigterm():
        return _run(cfg, resume=resume, overwrite=overwrite, evaluate=evaluate)


def _run(cfg: JobConfig, *, resume: str, overwrite: bool, evaluate: bool) -> dict[str, Any]:
    from job.data.prepare import prepare, summary, write_prepared
    from job.data.sources import check_source
    from job.storage.publish import build_manifest, publish_run
    from job.train.model import load_tokenizer, resolve_model_path
    from job.train.resume import plan_run
    from job.train.trainer import train

    started = _now()
    check_source(cfg.data.source)
    model_path = resolve_model_path(cfg.model.name)  # the one place the model's location is resolved
    plan = plan_run(cfg, resume, overwrite)
    cfg, run = plan.cfg, plan.run  # from here on the config is final
    if plan.publish_only:
        _say(f"run {run.run_id} finished earlier but was not published; publishing it now")
        return {"run_id": run.run_id, "location": publish_run(run.path, plan.destination), "metrics": None}
    _say(f"run {run.run_id}: {run.path}" + (f" -> {plan.destination}" if is_remote(cfg.output.uri) else ""))

    tokenizer = load_tokenizer(cfg.model, model_path)
    prepared = prepare(cfg, tokenizer)
    write_prepared(prepared, run.sub("data"))
    _say(summary(prepared))

    result = train(cfg, run, prepared, checkpoint=plan.checkpoint, model_path=model_path, tokenizer=tokenizer)
    if int(os.environ.get("RANK", "0")) != 0:
        return {"run_id": run.run_id, "steps": result.global_step}  # rank 0 evaluates and publishes
    _say(f"trained {result.global_step} steps, final loss {result.final_loss}; adapter in {result.adapter_dir}")

    metrics = None
    if evaluate:
        from job.evaluation.evaluate import evaluate_models
        from job.evaluation.report import headline_markdown
        from job.train.model_card import add_results

        metrics = evaluate_models(
            cfg, run.sub("eval"), adapter=result.adapter_dir, compare_base=cfg.evaluation.compare_base,
            rows=prepared.splits.eval, train_log=result.train_log, model=result.model, tokenizer=tokenizer,
        )  # the trained model in memory; the base is the same weights with the adapter disabled
        add_results(result.adapter_dir, headline_markdown(metrics))

    manifest = build_manifest(
        run.path, config=cfg.model_dump(mode="json"), status="completed", started_at=started, ended_at=_now(),
        metrics=metrics,
    )
    location = publish_run(run.path, plan.destination, manifest, replace=overwrite)
    _say(f"published {location}")
    if metrics:
        from job.evaluation.report import headline_line

        for label, values in metrics.items():
            if label in ("base", "tuned"):
                _say(headline_line(label, values))
        _say(f"report: {run.path / 'eval' / 'report.html'} (and report.md)")
    return {"run_id": run.run_id, "location": location, "metrics": metrics, "steps": result.global_step}
