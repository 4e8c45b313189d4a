"""Run configuration: a YAML preset or file, then `FINETUNE_*` environment overrides, then `--set` overrides.

Every field is validated by pydantic; any problem becomes a one-line `ConfigError` (exit code 2) that names the
field. The resolved config is saved with each run and never holds secrets (tokens come from the environment).
"""

from __future__ import annotations

import importlib.util
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from job.errors import ConfigError
from job.settings import PRESET_PACKAGE

ENV_PREFIX = "FINETUNE_"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def destination_problem(uri: str) -> str | None:
    """Why results cannot be written to `uri` (a local path, `file://` or `s3://bucket/prefix`), or None: the one
    rule for `output.uri`, `training.checkpoint_uri` and every `--output`."""
    scheme = _SCHEME.match(uri)
    if scheme and scheme.group(0) not in ("s3://", "file://"):
        return (f"unsupported URI scheme {scheme.group(1)!r}; use a local path, file:// or s3://bucket/prefix "
                "(lower case)")
    if uri.startswith("s3://") and not uri.removeprefix("s3://").split("/", 1)[0]:
        return "expected s3://bucket/prefix"
    return None


def _writable(value: str | None) -> str | None:
    if value is not None and (problem := destination_problem(value)):
        raise ValueError(problem)
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class ModelConfig(_Section):
    name: str = "google/gemma-2b-it"
    """Hub id, local directory, `.gguf` file, or `s3://` prefix of a model directory."""
    revision: str | None = None
    quantization: Literal["4bit", "8bit", "none"] = "4bit"
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Compute dtype; `auto` is bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU."""
    attn_implementation: str | None = None
    """None lets transformers choose (sdpa); set `flash_attention_2` where it is installed."""
    trust_remote_code: bool = False
    chat_template: str | None = None
    """For a tokenizer without a chat template (a base model): `gemma` or `chatml` (shipped with the job) or the
    path of a Jinja file. A tokenizer's own template is kept; the adapter's tokenizer carries the one used."""


class MethodConfig(_Section):
    type: Literal["lora", "prompt_tuning"] = "lora"
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    use_dora: bool = False
    """DoRA (weight-decomposed LoRA, peft's `use_dora`); vLLM cannot serve DoRA adapters: export them merged."""
    use_rslora: bool = False
    """Rank-stabilized LoRA (peft's `use_rslora`): scales by alpha/sqrt(r) instead of alpha/r."""
    num_virtual_tokens: int = Field(20, ge=1)
    prompt_tuning_init_text: str | None = "Translate the question into a SQL query for the given database schema:"


class DataConfig(_Section):
    source: str = "gretelai/synthetic_text_to_sql"
    """Hub dataset id, a local .jsonl/.json/.parquet/.csv file or folder of them, or an `s3://` object or prefix."""
    train_split: str = "train"
    eval_split: str = "test"
    max_train_rows: int | None = Field(None, ge=1)
    max_eval_rows: int | None = Field(200, ge=1)
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    """Share of rows held out for evaluation when the source has a single split."""
    seed: int = 42
    strict: bool = False
    """A JSON line of a data file that is not UTF-8, not JSON or not an object fails the run (naming file, line and
    cause) instead of being dropped and counted like other bad rows (`not_utf8`, `not_json`, `not_an_object`)."""


class TrainingConfig(_Section):
    max_seq_len: int = Field(512, ge=16)
    max_steps: int | None = Field(None, ge=1)
    """Overrides `epochs` when set."""
    epochs: float = Field(1.0, gt=0.0)
    per_device_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    learning_rate: float = Field(2e-4, gt=0.0)
    lr_scheduler: str = "constant_with_warmup"
    """A transformers scheduler name; `constant` has no warmup (transformers ignores the warmup for it)."""
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    """Share of the optimizer steps spent warming the learning rate up linearly from 0."""
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(0.3, gt=0.0)
    optim: str = "auto"
    """`auto`: paged 8-bit AdamW for 4-bit bases on CUDA, fused AdamW on CUDA otherwise, AdamW on CPU."""
    gradient_checkpointing: bool = True
    packing: bool | Literal["auto"] = "auto"
    """Pack rows padding-free (LoRA only). `auto` packs when the attention has variable-length kernels
    (flash_attention_2/3), where packing saves work; with SDPA/eager a packed batch is one long sequence with a
    block mask, slower than padding (see BENCHMARKS.md), so `auto` batches rows of similar length instead."""
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(100, ge=1)
    save_total_limit: int | None = Field(3, ge=1)
    seed: int = 42
    report_to: Literal["tensorboard", "mlflow", "wandb", "none"] = "tensorboard"
    """Experiment tracker, through transformers' integration; the run id is the tracker's run name. Its settings
    (MLFLOW_TRACKING_URI, WANDB_PROJECT, credentials) come from the environment, never from the config."""
    checkpoint_uri: str | None = None
    """Where checkpoints are mirrored as they are saved (e.g. `s3://bucket/ckpt/run`), for resume on a new machine;
    default for an s3:// output: `<output.uri>/<run_id>/checkpoints`."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """With several processes (torchrun): `ddp` replicates the base on every device and syncs the adapter's
    gradients; `fsdp` shards the base's layers across devices, for bases that do not fit one."""
    collective_timeout_s: float = Field(1800, gt=0)
    """How long a process waits for the others at any collective step before the run fails (a dead rank)."""

    @model_validator(mode="after")
    def _warmup_runs(self) -> TrainingConfig:
        if self.lr_scheduler == "constant" and self.warmup_ratio > 0:
            raise ValueError(
                "lr_scheduler 'constant' ignores warmup_ratio; use constant_with_warmup, or set warmup_ratio to 0"
            )
        return self

    @field_validator("checkpoint_uri")
    @classmethod
    def _checkpoint_uri_writable(cls, value: str | None) -> str | None:
        return _writable(value)

    @field_validator("report_to")
    @classmethod
    def _tracker_installed(cls, value: str) -> str:
        if value != "none" and importlib.util.find_spec(value) is None:
            raise ValueError(f"needs the {value} package: pip install 'finetune-job[tracking]'")
        return value


class EvaluationConfig(_Section):
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(16, ge=1)
    compare_base: bool = True
    """`finetune run` also evaluates the base model on the same rows."""
    sql_timeout_s: float = Field(2.0, gt=0.0)
    max_result_rows: int = Field(10_000, ge=1)
    top_domains: int = Field(10, ge=1)
    test_suite_size: int = Field(8, ge=0)
    """Most extra databases per row in its test suite (execution accuracy must hold on all); 0 turns suites off."""
    suite_candidates: int = Field(64, ge=1)
    """Candidate databases generated per row while distilling its suite (the budget)."""
    seed: int = 0
    """Seeds every row's suite (with the row id), so suites are identical across runs."""
    fixed_now: str = Field("2024-01-15 12:00:00", pattern=r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
    """What NOW(), CURDATE(), CURRENT_DATE and date('now') mean in scored SQL."""
    workers: int = Field(0, ge=0)
    """Processes that score rows; 0: one per available CPU core (at most 8)."""

    @field_validator("fixed_now", mode="before")
    @classmethod
    def _timestamp_text(cls, value: Any) -> Any:
        """YAML reads `2024-01-15 12:00:00` as a datetime; keep it as the text it was."""
        return value.strftime("%Y-%m-%d %H:%M:%S") if hasattr(value, "strftime") else value


class OutputConfig(_Section):
    uri: str = "./runs"
    """Local folder, `file://` URI or `s3://bucket/prefix`; each run writes to `<uri>/<run_id>/`."""
    run_id: str | None = None

    @field_validator("uri")
    @classmethod
    def _uri_writable(cls, value: str) -> str:
        return _writable(value)

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, value: str | None) -> str | None:
        if value is not None and (not value or "/" in value or value in {".", ".."}):
            raise ValueError("must be a non-empty name without '/'")
        return value


class JobConfig(_Section):
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    output: OutputConfig = OutputConfig()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def list_presets() -> dict[str, str]:
    """Preset name -> its one-line description (the file's first comment line)."""
    presets = {}
    for entry in sorted(resources.files(PRESET_PACKAGE).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            first = entry.read_text().splitlines()[0] if entry.read_text() else ""
            presets[entry.name.removesuffix(".yaml")] = first.lstrip("# ").strip()
    return presets


def _read_yaml(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {name_or_path}")
        text = path.read_text()
    else:
        preset = resources.files(PRESET_PACKAGE) / f"{name_or_path}.yaml"
        if not preset.is_file():
            raise ConfigError(
                f"unknown preset {name_or_path!r}; choose one of: {', '.join(list_presets())} (or a YAML file path)"
            )
        text = preset.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {name_or_path}: invalid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {name_or_path}: expected a mapping of sections at the top level")
    return data


def _set_path(data: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{origin}: key {dotted!r} must look like section.field (e.g. training.max_steps)")
    section, field = parts
    if section not in JobConfig.model_fields:
        raise ConfigError(f"{origin}: unknown section {section!r} in {dotted!r}; sections: "
                          f"{', '.join(JobConfig.model_fields)}")
    section_model = JobConfig.model_fields[section].annotation
    if field not in section_model.model_fields:
        raise ConfigError(f"{origin}: unknown key {dotted!r}; {section} has: {', '.join(section_model.model_fields)}")
    target = data.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"{origin}: section {section!r} is not a mapping")
    target[field] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`key.sub=value` -> (key.sub, value parsed as YAML: numbers, booleans, null and lists get their types)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def env_overrides(environ: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """`FINETUNE_OUTPUT_URI=s3://b/p` -> ("output.uri", "s3://b/p"); FINETUNE_CONFIG is handled by the CLI."""
    environ = os.environ if environ is None else environ
    found = []
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == f"{ENV_PREFIX}CONFIG":
            continue
        section, _, field = name.removeprefix(ENV_PREFIX).lower().partition("_")
        if section in JobConfig.model_fields and field:
            found.append((f"{section}.{field}", raw))
    return found


def _format_validation_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    problem = first["msg"]
    got = first.get("input")
    if first["type"] == "extra_forbidden":
        return f"unknown key {where!r}"
    if not isinstance(got, dict):
        return f"{where}: {problem} (got {got!r})"
    return f"{where}: {problem}"


def load_config(
    name_or_path: str,
    overrides: list[str] = (),
    environ: dict[str, str] | None = None,
) -> JobConfig:
    """Resolve preset/file, then environment, then `--set` overrides, and validate the whole."""
    data = _read_yaml(name_or_path)
    for key, raw in env_overrides(environ):
        _set_path(data, key, parse_override(f"{key}={raw}")[1], origin=f"environment {ENV_PREFIX}{key}")
    for item in overrides:
        key, value = parse_override(item)
        _set_path(data, key, value, origin=f"--set {item}")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"config {name_or_path}: {_format_validation_error(exc)}") from None
