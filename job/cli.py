"""`finetune`: the command line. It parses arguments and calls the stages; heavy imports happen inside commands."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from job.errors import EXIT_UNEXPECTED, EXIT_USAGE, ConfigError, JobError, redact

DEFAULT_PRESET = "gemma-2b-it-qlora"


def _load(config_name: str, overrides: tuple[str, ...], output: str | None = None, run_id: str | None = None) -> Any:
    from job.config import load_config

    extra = [f"output.uri={output}"] if output else []
    extra += [f"output.run_id={run_id}"] if run_id else []
    return load_config(config_name, [*overrides, *extra])


def _with(options: list[Callable[..., Any]]) -> Callable[..., Any]:
    def apply(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func

    return apply


_config_options = _with([
    click.option("--config", "config_name", envvar="FINETUNE_CONFIG", default=DEFAULT_PRESET, show_default=True,
                 help="Preset name (see `finetune presets`) or path to a YAML file."),
    click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                 help="Override a field, e.g. --set training.max_steps=100 (repeatable)."),
])
_output_option = click.option("--output", help="Where runs go: a folder or s3://bucket/prefix (sets output.uri).")
_run_options = [
    _output_option,
    click.option("--run-id", help="Name of the run folder (sets output.run_id); default: timestamp-confighash."),
    click.option("--resume", default="auto", show_default=True, metavar="auto|never|PATH",
                 help="auto: continue the newest unfinished run of this config from its newest complete checkpoint."),
    click.option("--overwrite", is_flag=True, help="Replace a finished run with the same run id."),
]


class _Redact(logging.Filter):
    """Every log line leaves the handlers without URL credentials (user:password@) or AWS session tokens."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="finetune-job")
def cli(verbose: bool) -> None:
    """Fine-tune an LLM for text-to-SQL with QLoRA, LoRA or prompt tuning; evaluate it by running its SQL.

    Exit codes: 0 success, 1 unexpected error, 2 usage or configuration error, 3 missing input or
    credentials, 75 stopped by SIGTERM after saving a checkpoint (safe to retry with --resume auto).
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _Redact) for f in handler.filters):
            handler.addFilter(_Redact())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its optional-kernel notice is not actionable
    # Deprecation notices raised inside transformers/peft/trl about their own internals; nothing a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|trl)\.")


@cli.command()
def presets() -> None:
    """List the shipped presets, one line each."""
    from job.config import list_presets

    for name, description in list_presets().items():
        click.echo(f"{name:28s} {description}")


@cli.command()
@_config_options
@click.option("--output", metavar="DIR_OR_URI",
              help="Folder or s3:// URI for stats.json, examples.jsonl and eval_ids.json (manifest.json last); "
                   "default: prepare-<config hash> in the staging root.")
@click.option("--overwrite", is_flag=True, help="Replace what an earlier prepare wrote to --output.")
def prepare(config_name: str, overrides: tuple[str, ...], output: str | None, overwrite: bool) -> None:
    """Load, validate, split and tokenize the data; print and save what was kept and dropped."""
    from job.data.prepare import prepare as prepare_data
    from job.data.prepare import summary, write_prepared
    from job.data.sources import check_source
    from job.storage.run_folder import config_hash, staging_root
    from job.train.model import load_tokenizer

    cfg = _load(config_name, overrides)
    if output:
        _check_output(output, "stats.json", overwrite)
    check_source(cfg.data.source)
    with _stop_on_sigterm():
        started = _now()
        prepared = prepare_data(cfg, load_tokenizer(cfg.model))
        out = output or str(staging_root(cfg) / f"prepare-{config_hash(cfg)}")
        _publish_results(cfg, out, overwrite or not output, started, lambda local: write_prepared(prepared, local),
                         status="prepared")
    click.echo(summary(prepared))
    click.echo(f"wrote {out}")


@cli.command()
@_config_options
@_with(_run_options)
def train(
    config_name: str, overrides: tuple[str, ...], output: str | None, run_id: str | None, resume: str, overwrite: bool
) -> None:
    """Train the configured method and save the adapter into a run folder."""
    from job.pipeline import run_pipeline

    run_pipeline(_load(config_name, overrides, output, run_id), resume=resume, overwrite=overwrite, evaluate=False)


@cli.command()
@_config_options
@_with(_run_options)
def run(
    config_name: str, overrides: tuple[str, ...], output: str | None, run_id: str | None, resume: str, overwrite: bool
) -> None:
    """Train, then evaluate the base and the tuned model on the same rows, and publish the run."""
    from job.pipeline import run_pipeline

    cfg = _load(config_name, overrides, output, run_id)
    summary = run_pipeline(cfg, resume=resume, overwrite=overwrite, evaluate=True)
    if cfg.training.report_to in ("mlflow", "wandb"):
        from job.after.tracking import log_eval_metrics

        log_eval_metrics(cfg.training.report_to, summary["run_id"], summary.get("metrics"))


@cli.command()
@_config_options
@click.option("--adapter", help="Adapter folder or s3:// URI to evaluate on top of the base model.")
@click.option("--base-only", is_flag=True, help="Evaluate the base model alone.")
@click.option("--run", "run_uri", metavar="PATH_OR_URI",
              help="A finished run: its adapter on exactly its recorded eval rows (data/eval_ids.json), with its "
                   "config (plus --set).")
@click.option("--rows", "rows_source", metavar="FILE_OR_URI",
              help="Evaluate every row of this dataset file (no split); with --run, rows it trained on are refused.")
@click.option("--compare-base", is_flag=True, help="With --adapter or --run, also evaluate the base model.")
@click.option("--output", required=True, help="Folder or s3:// URI: files first, manifest.json last.")
@click.option("--overwrite", is_flag=True, help="Replace results already in --output.")
def evaluate(
    config_name: str, overrides: tuple[str, ...], adapter: str | None, base_only: bool, run_uri: str | None,
    rows_source: str | None, compare_base: bool, output: str, overwrite: bool,
) -> None:
    """Generate SQL for held-out rows, execute it in a sandbox on each row's test suite, and score it."""
    from job.evaluation.evaluate import evaluate_models, read_rows, refuse_trained_rows, run_rows

    if sum(map(bool, (adapter, base_only, run_uri))) != 1:
        raise ConfigError("give exactly one of --adapter PATH_OR_URI, --base-only and --run PATH_OR_URI")
    if compare_base and base_only:
        raise ConfigError("--compare-base needs --adapter or --run")
    _check_output(output, "metrics.json", overwrite)
    from job.storage.objects import check_input

    for option, value in (("--run", run_uri), ("--rows", rows_source), ("--adapter", adapter)):
        if value:
            check_input(value, option)
    with _stop_on_sigterm():
        rows = None
        if run_uri:
            cfg, rows, trained = run_rows(run_uri, overrides)
            adapter = f"{run_uri.rstrip('/')}/adapter"
            rows = read_rows(rows_source) if rows_source else rows
            refuse_trained_rows(rows, trained, f"--rows {rows_source}" if rows_source else f"--run {run_uri}")
        else:
            cfg = _load(config_name, overrides)
            rows = read_rows(rows_source) if rows_source else None
        started = _now()
        metrics = _publish_results(
            cfg, output, overwrite, started,
            lambda local: evaluate_models(cfg, local, adapter=adapter, compare_base=compare_base, rows=rows),
        )
    _echo_metrics(metrics)
    click.echo(f"wrote {output}")


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _publish_results(
    cfg: Any, output: str, overwrite: bool, started: str, produce: Callable[[Path], Any], status: str = "completed"
) -> Any:
    """Stage results locally, then publish them to `output` (a folder or s3:// URI) like a run: every file first,
    manifest.json last. With `overwrite`, the files of the results it replaces that are not written again are
    deleted; nothing else in `output` is touched."""
    import tempfile

    from job.storage import objects as storage
    from job.storage.publish import build_manifest, publish_run

    name = output.rstrip("/").rsplit("/", 1)[-1] or "results"
    with tempfile.TemporaryDirectory(prefix="finetune-results-") as staging:
        local = Path(staging) / name
        local.mkdir()
        metrics = produce(local)
        manifest = build_manifest(local, config=cfg.model_dump(mode="json"), status=status,
                                  started_at=started, ended_at=_now(), metrics=metrics)
        destination = output if storage.is_remote(output) else str(storage.local_path(output))
        publish_run(local, destination, manifest, replace=overwrite, prune=False)
    return metrics


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM stops a command at once with exit 75, like a run outside training: what it wrote does not look
    complete (the manifest comes last), so the command can simply run again."""
    from job.train.preemption import stop_on_sigterm

    with stop_on_sigterm("stopped by SIGTERM before its results were complete (no manifest.json was written); "
                         "run the same command again"):
        yield


def _check_output(output: str, results_file: str, overwrite: bool) -> None:
    """`output` is a destination the job can write (else exit 2), and holds no earlier results without
    `overwrite`."""
    from job.storage.objects import check_destination

    check_destination(output, "--output")
    _refuse_existing_results(output, overwrite, results_file)


def _echo_metrics(metrics: dict[str, Any]) -> None:
    from job.evaluation.report import headline_line, noise_statements

    for label, values in metrics.items():
        click.echo(headline_line(label, values))
    for statement in noise_statements(metrics):
        click.echo(statement)


@cli.command()
@_config_options
@click.option("--predictions", required=True, metavar="FILE_OR_URI",
              help='JSON lines (a file or an s3:// object), one {"id": ..., "sql": ...} per row.')
@click.option("--rows", "rows_source", metavar="FILE_OR_URI",
              help="Dataset file holding the rows the predictions name (default: data.source).")
@click.option("--output", metavar="DIR_OR_URI",
              help="Folder or s3:// URI for metrics.json and scored.jsonl (manifest.json last).")
@click.option("--overwrite", is_flag=True, help="Replace results already in --output.")
def score(
    config_name: str, overrides: tuple[str, ...], predictions: str, rows_source: str | None, output: str | None,
    overwrite: bool,
) -> None:
    """Score existing predictions against their dataset rows by executing both on each row's test suite."""
    from job.evaluation.evaluate import score_file, write_scored
    from job.evaluation.report import headline_line
    from job.storage.objects import check_input

    cfg = _load(config_name, overrides)
    if output:
        _check_output(output, "metrics.json", overwrite)
    check_input(predictions, "--predictions")
    if rows_source:
        check_input(rows_source, "--rows")
    with _stop_on_sigterm():
        started = _now()
        metrics, per_row = score_file(cfg, predictions, rows_source=rows_source)
        if output:
            _publish_results(cfg, output, overwrite, started, lambda local: write_scored(local, metrics, per_row))
    click.echo(headline_line("predictions", metrics))
    if output:
        click.echo(f"wrote {output}")


def _refuse_existing_results(output: str, overwrite: bool, results_file: str = "metrics.json") -> None:
    from job.storage import objects as storage

    if not overwrite and storage.exists(storage.join(output, results_file)):
        raise ConfigError(
            f"--output {output} already holds results ({results_file}); pass --overwrite to replace them"
        )


@cli.group()
def artifacts() -> None:
    """List and fetch published runs."""


@artifacts.command("ls")
@click.argument("uri")
def artifacts_ls(uri: str) -> None:
    """List the runs under URI (a folder or s3://bucket/prefix), complete, incomplete or corrupt."""
    from job.storage.artifacts import list_runs
    from job.storage.objects import check_input

    check_input(uri, "URI")
    for run_info in list_runs(uri):
        state = "corrupt" if run_info["problem"] else run_info.get("status") or (
            "complete" if run_info.get("complete") else "incomplete")
        metrics = run_info["metrics"]
        accuracy = (metrics.get("tuned") if isinstance(metrics.get("tuned"), dict) else metrics).get(
            "execution_accuracy")
        extra = f"  execution_accuracy {accuracy:.1%}" if isinstance(accuracy, float) else ""
        if run_info["problem"]:
            extra = f"  {run_info['problem']}"
        line = f"{run_info['run_id']:40s} {state:10s} {run_info.get('ended_at') or '-':26s}{extra}"
        click.echo(_printable(line))


def _printable(text: str) -> str:
    """Names and fields from a listing or a manifest, without control or bidi characters (they could rewrite the
    terminal or disguise a name)."""
    import re

    return re.sub(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", "?", text)


@artifacts.command("pull")
@click.argument("run_uri")
@click.argument("dest")
@click.option("--with-checkpoints", is_flag=True, help="Also fetch the trainer checkpoints (with optimizer state).")
@click.option("--checkpoints-from", metavar="URI",
              help="With --with-checkpoints: where the checkpoints are, when the manifest says they are outside "
                   "the run (a training.checkpoint_uri elsewhere); a manifest alone never sends a pull there.")
def artifacts_pull(run_uri: str, dest: str, with_checkpoints: bool, checkpoints_from: str | None) -> None:
    """Download RUN_URI into the local folder DEST and verify every file against the manifest's sha256.

    RUN_URI is a published run (folder or s3://.../<run_id>), or a SageMaker training job's model.tar.gz (or
    the output folder holding it)."""
    from job.storage.artifacts import pull_run
    from job.storage.objects import check_destination, check_input, local_path

    check_input(run_uri, "RUN_URI")
    check_destination(dest, "DEST", remote=False)
    if checkpoints_from and not with_checkpoints:
        raise ConfigError("--checkpoints-from needs --with-checkpoints")
    if checkpoints_from:
        check_input(checkpoints_from, "--checkpoints-from")
    with _stop_on_sigterm():
        pulled = pull_run(run_uri, local_path(dest), with_checkpoints=with_checkpoints,
                          checkpoints_from=checkpoints_from)
    click.echo(f"pulled and verified {pulled}")


@artifacts.command("push")
@click.argument("run_dir")
@click.argument("dest_uri")
def artifacts_push(run_dir: str, dest_uri: str) -> None:
    """Publish a local run folder (with its manifest.json) to DEST_URI; retries a publish that failed."""
    from job.storage.objects import check_destination, check_input, local_path
    from job.storage.publish import publish_run

    check_destination(run_dir, "RUN_DIR", remote=False)
    check_input(run_dir, "RUN_DIR")
    if not local_path(run_dir).is_dir():
        raise ConfigError(f"RUN_DIR {run_dir}: not a folder")
    check_destination(dest_uri, "DEST_URI")
    with _stop_on_sigterm():
        published = publish_run(local_path(run_dir), dest_uri)
    click.echo(f"published {published}")


@cli.command()
@click.argument("run_or_adapter")
@click.option("--output", required=True, help="New folder or s3:// URI for the exported model (never overwritten).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              help="Precision of the merged weights (QLoRA bases are reloaded in it, never merged in 4-bit).")
@click.option("--format", "export_format", type=click.Choice(["merged", "vllm"]), default="merged", show_default=True,
              help="merged: adapter merged into the base; vllm: the adapter checked for vLLM's LoRA loader.")
def export(run_or_adapter: str, output: str, dtype: str, export_format: str) -> None:
    """Export a run's model (RUN_OR_ADAPTER: run or adapter folder, local or s3://) for serving."""
    from job.after.export import export_for_vllm, export_merged, refuse_existing_output
    from job.after.source import open_run_source
    from job.storage.objects import check_destination, check_input

    check_destination(output, "--output")
    check_input(run_or_adapter, "RUN_OR_ADAPTER")
    refuse_existing_output(output)
    with _stop_on_sigterm():
        source = open_run_source(run_or_adapter, "RUN_OR_ADAPTER")
        if export_format == "vllm":
            result = export_for_vllm(source, output)
        else:
            result = export_merged(source, output, dtype)
            click.echo(f"stops at: {' '.join(result['stop_tokens'])}")
    click.echo(f"exported {result['location']}")
    click.echo(f"serve with: {result['serve']}")


@cli.command()
@click.option("--run", "run_uri", required=True, help="Run or adapter folder, local or s3://.")
@click.option("--schema", "schema_path", metavar="FILE",
              help="Local SQL file with the CREATE TABLE (and INSERT) statements the questions are about.")
@click.option("--file", "questions_file", metavar="FILE",
              help='Local JSON lines {"question": ..., optional "id", "schema"}: answered in batches, one JSON line '
                   'each.')
@click.option("--execute", is_flag=True, help="Run the SQL in the in-memory sandbox on the schema's data.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.argument("question", required=False)
def ask(
    run_uri: str, schema_path: str | None, questions_file: str | None, execute: bool, max_new_tokens: int,
    batch_size: int, question: str | None,
) -> None:
    """Answer QUESTION (or --file's questions) about --schema with a run's model; print the SQL."""
    import json

    from job.after.ask import answer, as_rows, format_table, load_model, read_questions
    from job.after.source import open_run_source
    from job.storage.objects import check_input, decode_utf8, local_input

    if bool(question) == bool(questions_file):
        raise ConfigError('give exactly one of a QUESTION argument and --file questions.jsonl')
    check_input(run_uri, "--run")
    schema = ""
    if schema_path is not None:
        schema = decode_utf8(local_input(schema_path, "--schema").read_bytes(), f"--schema {schema_path}")
    questions = read_questions(local_input(questions_file, "--file")) if questions_file else [{"question": question}]
    if not schema.strip() and not all(q.get("schema") for q in questions):
        raise ConfigError("--schema schema.sql is required (or a \"schema\" in every --file line)")
    source = open_run_source(run_uri, "--run")
    model, tokenizer = load_model(source)
    answers = answer(model, tokenizer, as_rows(schema, questions), execute=execute,
                     max_new_tokens=max_new_tokens, batch_size=batch_size)
    if questions_file:
        for record in answers:
            click.echo(json.dumps(record, default=str))
        return
    record = answers[0]
    click.echo(record["sql"])
    if execute:
        result = format_table(record["columns"], record["rows"]) if "error" not in record else None
        click.echo(result or f"execution error: {record['error']}")


@cli.command()
@click.argument("run_uris", nargs=-1, required=True)
@click.option("--output", metavar="FILE_OR_URI", default="compare.md", show_default=True,
              help="Markdown file the table is written to: a local file or an s3:// object.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
def compare(run_uris: tuple[str, ...], output: str, overwrite: bool) -> None:
    """Compare finished runs (folders or s3:// URIs) side by side, from their manifests."""
    from job.after.compare import load_run, markdown_table
    from job.storage import objects as storage

    storage.check_destination(output, "--output")
    if output.endswith("/") or (not storage.is_remote(output) and storage.local_path(output).is_dir()):
        raise ConfigError(f"--output {output}: names a folder; give the Markdown file to write, e.g. compare.md")
    if not overwrite and storage.exists(output):
        raise ConfigError(f"--output {output} already exists; pass --overwrite to replace it")
    for uri in run_uris:
        storage.check_input(uri, "RUN_URIS")
    table = markdown_table([load_run(uri) for uri in run_uris])
    storage.write_text(output, table)  # one object, or a local file replaced atomically
    click.echo(table, nl=False)
    click.echo(f"wrote {output}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: expected errors become one line on stderr and their documented exit code."""
    try:
        code = cli.main(args=argv, prog_name="finetune", standalone_mode=False)
    except click.exceptions.UsageError as exc:
        hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx else ""
        click.echo(redact(f"error: {exc.format_message()}{hint}"), err=True)
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(EXIT_UNEXPECTED)
    except JobError as exc:
        rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        click.echo(redact(f"error{rank}: {exc}"), err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(redact(f"error: {exc.format_message()}"), err=True)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
