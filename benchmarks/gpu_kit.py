"""Finish the offline GPU kit after `pip download` (run by `make gpu-wheels`): python benchmarks/gpu_kit.py KIT.

1. bitsandbytes' wheel holds one native library per CUDA, ROCm and XPU version (129 MB unpacked, 43 MB zipped).
   Keep the CPU library and those of the target CUDA (`--cuda 130`: torch 2.11.0+cu130 in the GPU image), and drop
   the rest from the wheel and its RECORD; bitsandbytes loads `libbitsandbytes_cuda<torch.version.cuda>.so`.
2. Save the demo tokenizer (SmolLM2-135M-Instruct, converted from the demo .gguf) as files in KIT/tokenizer.
3. Write KIT/install.sh, the one-line offline install, and check that the kit fits the size limit.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 64 * 2**20
NATIVE = re.compile(r"bitsandbytes/libbitsandbytes_(\w+)\.(so|dll|dylib)$")


def slim_bitsandbytes(wheel: Path, keep_cuda: set[str]) -> tuple[int, int]:
    """Rewrite `wheel` in place without the native libraries of other accelerators; (bytes before, after)."""
    before = wheel.stat().st_size
    keep = {"cpu", *(f"cuda{version}" for version in keep_cuda)}
    with zipfile.ZipFile(wheel) as src:
        dropped = {n for n in src.namelist() if (m := NATIVE.search(n)) and m.group(1) not in keep}
        if not any(NATIVE.search(n) and "cuda" in n for n in set(src.namelist()) - dropped):
            raise SystemExit(f"error: {wheel.name} has no library for CUDA {sorted(keep_cuda)}; see --cuda")
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(x for x in lines if x.split(",", 1)[0] not in dropped) + "\n").encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    tmp.replace(wheel)
    return before, wheel.stat().st_size


def save_tokenizer(dest: Path) -> None:
    """The demo model's tokenizer (chat template included), converted from its .gguf once; a few MB of files."""
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from job.train.demo_model import fetch

    gguf = fetch(ROOT / "models")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(dest)


def install_line(kit: str) -> str:
    return (f'"${{PYTHON:-python3}}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade '
            f"--target {kit}/site {kit}/wheels/*.whl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kit", type=Path, help="The kit folder, with the downloaded wheels in KIT/wheels.")
    parser.add_argument("--cuda", default="130", help="CUDA versions to keep bitsandbytes libraries for (130,132).")
    args = parser.parse_args()
    kit, wheels = args.kit, args.kit / "wheels"
    for wheel in wheels.glob("bitsandbytes-*.whl"):
        before, after = slim_bitsandbytes(wheel, set(args.cuda.split(",")))
        print(f"{wheel.name}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB (CPU + CUDA {args.cuda} only)")
    if not (kit / "tokenizer" / "tokenizer_config.json").is_file():
        save_tokenizer(kit / "tokenizer")
    line = install_line(kit.as_posix())
    script = kit / "install.sh"
    script.write_text(f"#!/bin/sh\n# Offline install of the gpu-check kit (run from the repository root; written by "
                      f"make gpu-wheels)\nset -e\n{line}\n")
    script.chmod(0o755)
    files = [p for p in kit.rglob("*") if p.is_file() and "site" not in p.relative_to(kit).parts]
    total = sum(p.stat().st_size for p in files)
    wheel_bytes = sum(p.stat().st_size for p in wheels.glob("*.whl"))
    print(f"{len(list(wheels.glob('*.whl')))} wheels {wheel_bytes / 2**20:.1f} MiB, kit in all {total / 2**20:.1f} "
          f"MiB (limit {LIMIT_BYTES / 2**20:.0f} MiB)")
    print(f"offline install (from the repository root): {line}")
    if total > LIMIT_BYTES:
        raise SystemExit(f"error: the kit is {total / 2**20:.1f} MiB, over {LIMIT_BYTES / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
