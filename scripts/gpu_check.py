"""fleetdeck against a real NVIDIA GPU: what only a GPU can show.

    python scripts/gpu_check.py [--device 0|cpu] [--steps 40] [--work DIR] [--nvidia-smi PATH]

1. `fleetdeck gpus --json` field by field against `nvidia-smi --query-gpu=...` (exact for identity and
   total memory; within a tolerance for what moves between the two reads: used memory, utilisation,
   temperature, power).
2. A peft fine-tune through `fleetdeck finetune start SPEC --gpus DEVICE` (the real CLI, a detached job):
   while it trains, `gpus --json` must attribute the job's process (kind `finetune`, its job id) and its
   memory on that GPU.
3. The planner's VRAM estimate for that job against the peak PyTorch reports (reserved and allocated)
   and the most NVML saw for the process.

It prints one line per check and a summary, and exits 1 if a check that must hold fails. With
`--device cpu` the fine-tune runs on the CPU and the GPU-only checks say n/a: the tests run it so
(with a stand-in nvidia-smi and faked NVML), so the script is known to work before a GPU is lent.
Nothing is downloaded: the model is a small random Llama made here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIB = 1024**2
SMI_FIELDS = ("index", "uuid", "name", "memory.total", "memory.used", "utilization.gpu", "temperature.gpu",
              "power.draw", "driver_version")


@dataclass
class Check:
    what: str
    reference: object
    fleetdeck: object
    ok: bool | None  # None: not applicable here
    must: bool = True

    def line(self) -> str:
        mark = "n/a " if self.ok is None else ("ok  " if self.ok else ("FAIL" if self.must else "note"))
        return f"{mark} {self.what:<44} reference={self.reference!s:<24} fleetdeck={self.fleetdeck!s}"


def nvidia_smi(cmd: str) -> list[dict[str, str]]:
    out = subprocess.run([cmd, f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [dict(zip(SMI_FIELDS, (c.strip() for c in line.split(",")))) for line in out.splitlines() if line.strip()]


def fleetdeck_gpus() -> dict:
    """`fleetdeck gpus --json`, through the CLI's own code in this process."""
    from fleetdeck.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["gpus", "--json"])
    if rc != 0:
        raise SystemExit(f"fleetdeck gpus --json exited {rc}")
    return json.loads(buf.getvalue())


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def compare_gpus(smi: list[dict[str, str]], doc: dict) -> list[Check]:
    checks = [Check("GPU count", len(smi), len(doc["gpus"]), len(smi) == len(doc["gpus"]))]
    if smi:
        checks.append(Check("driver version", smi[0]["driver_version"], doc.get("driver_version"),
                            smi[0]["driver_version"] == doc.get("driver_version")))
    ours = {g["index"]: g for g in doc["gpus"]}
    for row in smi:
        i = int(row["index"])
        g = ours.get(i)
        if g is None:
            checks.append(Check(f"[{i}] present", "yes", "missing", False))
            continue
        checks.append(Check(f"[{i}] uuid", row["uuid"], g["uuid"], row["uuid"] == g["uuid"]))
        checks.append(Check(f"[{i}] name", row["name"], g["name"], row["name"] == g["name"]))
        total = _num(row["memory.total"])
        ours_total = None if g["memory_total_bytes"] is None else g["memory_total_bytes"] / MIB
        checks.append(Check(f"[{i}] memory.total MiB", total, ours_total,
                            None if total is None else ours_total is not None and abs(total - ours_total) < 1))
        for field, key, scale, tol in (("memory.used MiB", "memory_used_bytes", MIB, 512.0),
                                       ("utilization.gpu %", "utilization_gpu_pct", 1, 25.0),
                                       ("temperature.gpu C", "temperature_c", 1, 5.0),
                                       ("power.draw W", "power_draw_w", 1, 60.0)):
            ref = _num(row[field.split()[0]])
            val = g.get(key)
            val = None if val is None else val / scale
            ok = None if ref is None else (val is not None and abs(ref - val) <= tol)
            checks.append(Check(f"[{i}] {field} (±{tol:g}, read apart)", ref, None if val is None else round(val, 1), ok))
    return checks


def make_job(work: Path, steps: int, device: str) -> Path:
    """A small random Llama (large enough that its training memory is measurable), a dataset, a spec."""
    from tests.fakes.tiny_model import make_dataset, make_tiny_arch

    base = work / "base"
    if not (base / "config.json").exists():
        if device == "cpu":  # the tests' run: the flow, not the figures
            make_tiny_arch(base, "llama", hidden_size=128, num_attention_heads=2, max_position_embeddings=512)
        else:  # ~100 M parameters: a few hundred MiB of training memory, clear of the noise
            make_tiny_arch(base, "llama", hidden_size=1024, num_attention_heads=8, num_key_value_heads=8,
                           num_hidden_layers=8, intermediate_size=2816, max_position_embeddings=2048)
    dataset = make_dataset(work / "data.jsonl", n=64)
    spec = work / "gpu-check.toml"
    spec.write_text(f'name = "gpu-check"\nbase_model = "{base}"\ndataset = "{dataset}"\nbackend = "peft"\n'
                    f"lora_rank = 16\nmax_steps = {steps}\nbatch_size = {4 if device != 'cpu' else 1}\n"
                    f"max_seq_length = 256\nsave_steps = {steps}\nadapter_root = \"{work / 'adapters'}\"\n")
    return spec


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetdeck", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)


def finetune_checks(work: Path, device: str, steps: int) -> list[Check]:
    from engine.finetune.jobs import training_estimate
    from engine.finetune.spec import load_spec

    env = {**os.environ, "XDG_STATE_HOME": str(work / "state"), "HF_HUB_OFFLINE": "1"}
    store = str(work / "fd.db")
    spec_path = make_job(work, steps, device)
    estimate = training_estimate(load_spec(spec_path))
    started = cli(env, "finetune", "start", str(spec_path), "--gpus", device, "--store", store, "--force")
    checks = [Check("finetune start exit code", 0, started.returncode, started.returncode == 0)]
    if started.returncode != 0:
        print(started.stdout + started.stderr)
        return checks
    job_id = json.loads(cli(env, "finetune", "ls", "--json", "--store", store).stdout)[0]["id"]
    seen_kind, seen_job, seen_bytes = None, None, 0
    deadline = time.time() + 900
    while time.time() < deadline:
        jobs = json.loads(cli(env, "finetune", "ls", "--json", "--store", store).stdout)
        job = next(j for j in jobs if j["id"] == job_id)
        if device != "cpu":
            gpu = next((g for g in fleetdeck_gpus()["gpus"] if g["index"] == int(device)), None)
            for proc in (gpu or {}).get("processes", []):
                if proc.get("kind") == "finetune":
                    seen_kind, seen_job = proc["kind"], proc.get("model")
                    seen_bytes = max(seen_bytes, proc.get("gpu_memory_bytes") or 0)
        if job["state"] != "running":
            break
        time.sleep(0.5)
    checks.append(Check("job finished", "finished", job["state"], job["state"] == "finished"))
    if device == "cpu":
        checks.append(Check("job's process attributed on its GPU", "finetune", "n/a (cpu)", None))
    else:
        checks.append(Check("job's process attributed on its GPU", f"finetune {job_id}", f"{seen_kind} {seen_job}",
                            seen_kind == "finetune" and seen_job == job_id))
    est = estimate.total_bytes / MIB
    reserved = (job["outputs"].get("gpu_peak_reserved_bytes") or 0) / MIB or None
    allocated = (job["outputs"].get("gpu_peak_allocated_bytes") or 0) / MIB or None
    print("     planner estimate " + ", ".join(f"{k} {v / MIB:,.0f} MiB" for k, v in estimate.to_json().items()
                                              if k.endswith("_bytes")))
    if reserved is None:
        checks.append(Check("estimate vs torch peak reserved MiB", "n/a", round(est), None))
    else:
        # Safe means the estimate is not below what PyTorch reserved (the CUDA context is on top of both).
        checks.append(Check("estimate >= torch peak reserved MiB", round(reserved), round(est), est >= reserved))
        checks.append(Check("estimate / torch peak reserved", 1.0, round(est / reserved, 2), est / reserved <= 3.0,
                            must=False))
        checks.append(Check("torch peak allocated MiB", round(allocated or 0), round(est), None if not allocated else True))
    if device != "cpu":
        checks.append(Check("estimate >= NVML max for the process MiB", round(seen_bytes / MIB), round(est),
                            est >= seen_bytes / MIB, must=False))
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="0", help="GPU index for the fine-tune, or cpu")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    ap.add_argument("--nvidia-smi", default=shutil.which("nvidia-smi") or "nvidia-smi")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="fleetdeck-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"fleetdeck gpu check · {time.strftime('%Y-%m-%d %H:%M:%S %Z')} · work {work}")
    checks: list[Check] = []
    try:
        smi = nvidia_smi(args.nvidia_smi)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        print(f"nvidia-smi: {exc}")
        smi = []
        checks.append(Check("nvidia-smi answers", "yes", "no", False))
    if smi:
        checks += compare_gpus(smi, fleetdeck_gpus())
    checks += finetune_checks(work, args.device, args.steps)
    for c in checks:
        print(c.line())
    failed = [c for c in checks if c.ok is False and c.must]
    print(f"{sum(c.ok is True for c in checks)} ok, {len(failed)} failed, "
          f"{sum(c.ok is None for c in checks)} n/a, {sum(c.ok is False and not c.must for c in checks)} notes")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
