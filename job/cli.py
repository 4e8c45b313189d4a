"""`finetune`: the command line. It parses arguments and calls the stages; heavy imports happen inside commands."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from job.errors import EXIT_UNEXPECTED, EXIT_USAGE, ConfigError, JobError

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
@click.option("--output", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for stats.json, examples.jsonl and eval_ids.json.")
def prepare(config_name: str, overrides: tuple[str, ...], output: Path | None) -> None:
    """Load, validate, split and tokenize the data; print and save what was kept and dropped."""
    from job.data.prepare import prepare as prepare_data
    from job.data.prepare import summary, write_prepared
    from job.data.sources import check_source
    from job.storage.run_folder import config_hash, staging_root
    from job.train.model import load_tokenizer

    cfg = _load(config_name, overrides)
    check_source(cfg.data.source)
    prepared = prepare_data(cfg, load_tokenizer(cfg.model))
    out = output or staging_root(cfg) / f"prepare-{config_hash(cfg)}"
    write_prepared(prepared, out)
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

    run_pipeline(_load(config_name, overrides, output, run_id), resume=resume, overwrite=overwrite, evaluate=True)


@cli.command()
@_config_options
@click.option("--adapter", help="Adapter folder or s3:// URI to evaluate on top of the base model.")
@click.option("--base-only", is_flag=True, help="Evaluate the base model alone.")
@click.option("--output", required=True, help="Folder or s3:// URI for predictions, metrics.json and the reports.")
@click.option("--overwrite", is_flag=True, help="Replace results already in --output.")
def evaluate(
    config_name: str, overrides: tuple[str, ...], adapter: str | None, base_only: bool, output: str, overwrite: bool
) -> None:
    """Generate SQL for the held-out rows, execute it in a sandbox, and score it."""
    import tempfile

    from job.evaluation.evaluate import evaluate_models
    from job.evaluation.report import headline_line
    from job.storage import objects as storage

    if bool(adapter) == base_only:
        raise ConfigError("give exactly one of --adapter PATH_OR_URI and --base-only")
    cfg = _load(config_name, overrides)
    _refuse_existing_results(output, overwrite)
    with tempfile.TemporaryDirectory(prefix="finetune-eval-") as staging:
        local = Path(staging) if storage.is_remote(output) else Path(output)
        metrics = evaluate_models(cfg, local, adapter=adapter, compare_base=False)
        if storage.is_remote(output):
            storage.upload_dir(local, output)
    for label, values in metrics.items():
        click.echo(headline_line(label, values))
    click.echo(f"wrote {output}")


@cli.command()
@_config_options
@click.option("--predictions", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help='JSON lines, one {"id": ..., "sql": ...} per row.')
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), help="Folder for metrics.json.")
@click.option("--overwrite", is_flag=True, help="Replace results already in --output.")
def score(
    config_name: str, overrides: tuple[str, ...], predictions: Path, output: Path | None, overwrite: bool
) -> None:
    """Score existing predictions against their dataset rows by executing both."""
    from job.evaluation.evaluate import score_file
    from job.evaluation.report import headline_line

    cfg = _load(config_name, overrides)
    if output:
        _refuse_existing_results(str(output), overwrite)
    metrics = score_file(cfg, predictions, output)
    click.echo(headline_line("predictions", metrics))


def _refuse_existing_results(output: str, overwrite: bool) -> None:
    from job.storage import objects as storage

    if not overwrite and storage.exists(storage.join(output, "metrics.json")):
        raise ConfigError(f"--output {output} already holds results (metrics.json); pass --overwrite to replace them")


@cli.group()
def artifacts() -> None:
    """List and fetch published runs."""


@artifacts.command("ls")
@click.argument("uri")
def artifacts_ls(uri: str) -> None:
    """List the runs under URI (a folder or s3://bucket/prefix), complete or not."""
    from job.storage.artifacts import list_runs

    for run_info in list_runs(uri):
        state = run_info.get("status") or ("complete" if run_info.get("complete") else "incomplete")
        metrics = run_info.get("metrics") or {}
        accuracy = metrics.get("tuned", metrics).get("execution_accuracy") if isinstance(metrics, dict) else None
        extra = f"  execution_accuracy {accuracy:.1%}" if isinstance(accuracy, float) else ""
        click.echo(f"{run_info['run_id']:40s} {state:10s} {run_info.get('ended_at') or '-':26s}{extra}")


@artifacts.command("pull")
@click.argument("run_uri")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
def artifacts_pull(run_uri: str, dest: Path) -> None:
    """Download RUN_URI into DEST and verify every file against the manifest's sha256."""
    from job.storage.artifacts import pull_run

    click.echo(f"pulled and verified {pull_run(run_uri, dest)}")


@artifacts.command("push")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("dest_uri")
def artifacts_push(run_dir: Path, dest_uri: str) -> None:
    """Publish a local run folder (with its manifest.json) to DEST_URI; retries a publish that failed."""
    from job.storage.publish import publish_run

    click.echo(f"published {publish_run(run_dir, dest_uri)}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: expected errors become one line on stderr and their documented exit code."""
    try:
        code = cli.main(args=argv, prog_name="finetune", standalone_mode=False)
    except click.exceptions.UsageError as exc:
        hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(EXIT_UNEXPECTED)
    except JobError as exc:
        rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        click.echo(f"error{rank}: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
