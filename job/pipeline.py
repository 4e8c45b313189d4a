"""A whole run, top to bottom: run folder -> data -> train -> evaluate -> publish (manifest last)."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from typing import Any

from job.config import JobConfig
from job.errors import ConfigError
from job.storage.objects import is_remote


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_pipeline(cfg: JobConfig, *, resume: str, overwrite: bool, evaluate: bool) -> dict[str, Any]:
    """Train (and evaluate) one run, then publish it to `<output.uri>/<run_id>/`. Returns the run's summary.

    SIGTERM during training saves a checkpoint first; anywhere else it stops at once; both exit with 75.
    Launched as several processes (torchrun), rank 0 alone writes the run folder and publishes; all train and
    evaluate (see job.train.distributed).
    """
    from job.train import distributed
    from job.train.preemption import stop_on_sigterm

    with stop_on_sigterm(), distributed.session(cfg.training.collective_timeout_s):
        return _run(cfg, resume=resume, overwrite=overwrite, evaluate=evaluate)


def _plan(cfg: JobConfig, resume: str, overwrite: bool) -> Any:
    from job.data.sources import check_source
    from job.train.resume import plan_run

    check_source(cfg.data.source)
    return plan_run(cfg, resume, overwrite)


def _prepare(cfg: JobConfig, tokenizer: Any, data_dir: Any) -> Any:
    from job.data.prepare import prepare, summary, write_prepared

    prepared = prepare(cfg, tokenizer)
    write_prepared(prepared, data_dir)
    _say(summary(prepared))
    return prepared


def _run(cfg: JobConfig, *, resume: str, overwrite: bool, evaluate: bool) -> dict[str, Any]:
    from job.storage.publish import build_manifest, publish_run
    from job.train import distributed
    from job.train.model import load_tokenizer, resolve_model_path
    from job.train.trainer import train

    started = _now()
    if evaluate and cfg.training.distributed == "fsdp" and distributed.world_size() > 1:
        raise ConfigError("finetune run with training.distributed=fsdp: evaluation does not run on a sharded model; "
                          "use `finetune train`, then `finetune evaluate --adapter` on a machine that holds the base")
    with distributed.local_main_first():  # a conversion or download fills this node's cache once
        model_path = resolve_model_path(cfg.model.name)  # the one place the model's location is resolved
    # Rank 0 alone clears, creates and fetches; each node then stages the run on its own disk (they may not share one).
    plan = distributed.on_main(_plan, cfg, resume, overwrite).here()
    cfg, run = plan.cfg, plan.run  # from here on the config is final
    main = distributed.is_main()
    if plan.publish_only:
        if not main:
            return {"run_id": run.run_id, "location": plan.destination, "metrics": None}
        _say(f"run {run.run_id} finished earlier but was not published; publishing it now")
        return {"run_id": run.run_id, "location": publish_run(run.path, plan.destination), "metrics": None}
    distributed.ensure_checkpoint_here(plan.checkpoint, cfg.training.checkpoint_uri)
    distributed.say(f"run {run.run_id}: {run.path}" + (f" -> {plan.destination}" if is_remote(cfg.output.uri) else ""))

    tokenizer = load_tokenizer(cfg.model, model_path)
    prepared = distributed.on_main(_prepare, cfg, tokenizer, run.path / "data")  # tokenized once, sent to all

    result = train(cfg, run, prepared, checkpoint=plan.checkpoint, model_path=model_path, tokenizer=tokenizer)
    distributed.say(
        f"trained {result.global_step} steps, final loss {result.final_loss}; adapter in {result.adapter_dir}"
    )

    metrics = None
    if evaluate:
        from job.evaluation.evaluate import evaluate_models
        from job.evaluation.report import headline_markdown
        from job.train.model_card import add_results

        metrics = evaluate_models(
            cfg, run.sub("eval"), adapter=result.adapter_dir, compare_base=cfg.evaluation.compare_base,
            rows=prepared.splits.eval, train_log=result.train_log, model=result.model, tokenizer=tokenizer,
        )  # the trained model in memory; the base is the same weights with the adapter disabled
        if main:
            add_results(result.adapter_dir, headline_markdown(metrics))
    if not main:
        return {"run_id": run.run_id, "steps": result.global_step}  # rank 0 publishes

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
