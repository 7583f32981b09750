"""`fleetdeck finetune ...`: the same functions the Jobs screen calls."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetdeck.cmdutil import listing_store_of
from fleetdeck.cmdutil import store_of as _store
from fleetdeck.mutating import mutating
from fleetdeck.node_cli import log_text, local_ops, node_errors, node_option, ops_of, own_id
from fleetdeck.tables import print_table

if TYPE_CHECKING:
    from engine.finetune.jobs import JobRecord
    from engine.finetune.spec import JobSpec
    from fleet.config import FleetConfig
    from store.db import Store


def register(sub: Any) -> None:
    ft = sub.add_parser("finetune", help="LoRA/QLoRA fine-tunes: check, start, list, cancel, resume, logs")
    fsub = ft.add_subparsers(dest="finetune_cmd", metavar="ACTION", required=True)
    ck = fsub.add_parser("check", parents=[sub.common], help="check a job spec and its dataset; estimate VRAM")
    ck.add_argument("spec")
    ck.add_argument("--json", action="store_true")
    ck.set_defaults(handler=run_check)
    st = fsub.add_parser("start", parents=[sub.common], help="start a fine-tune on chosen GPUs (or cpu for peft)")
    st.add_argument("spec")
    st.add_argument("--gpus", required=True, help="GPU indices (0 or 0,1) or `cpu` (peft backend)")
    st.add_argument("--force", action="store_true", help="start even if the VRAM estimate says it will not fit")
    st.add_argument("--simulated", action="store_true", help="check VRAM against the simulated fleet")
    st.add_argument("--node", help="on this node of the fleet config (SPEC is then a spec name there)")
    st.add_argument("--slurm", action="store_true", help="submit to the site's Slurm ([slurm] in the fleet config; "
                    "with --node: that node's); --gpus is then a count")
    st.add_argument("--partition", help="with --slurm: the partition (default: [slurm] partition)")
    st.add_argument("--time", help="with --slurm: the time limit (90, 01:30:00, 1-12:00)")
    st.add_argument("--json", action="store_true", help="print the job's record (its id as on its node)")
    st.set_defaults(handler=run_start)
    ls = fsub.add_parser("ls", parents=[sub.common], help="jobs and their progress")
    ls.add_argument("--json", action="store_true")
    node_option(ls)
    ls.set_defaults(handler=run_ls)
    for name, fn, help_ in (("cancel", run_cancel, "stop cleanly: save a checkpoint and exit"),
                            ("resume", run_resume, "continue a cancelled or failed job from its last checkpoint"),
                            ("logs", run_logs, "the tail of a job's log")):
        p = fsub.add_parser(name, parents=[sub.common], help=help_)
        p.add_argument("id")
        if name == "logs":
            p.add_argument("-n", type=int, default=60)
        else:
            p.add_argument("--json", action="store_true", help="print the job's record (its id as on its node)")
        node_option(p)
        p.set_defaults(handler=fn)
    pr = fsub.add_parser("prune", parents=[sub.common],
                         help="forget finished, failed and cancelled jobs (their folders stay on disk)")
    node_option(pr)
    pr.set_defaults(handler=run_prune)
    mg = fsub.add_parser("merge", parents=[sub.common], help="merge an adapter version into its 16-bit base (a job)")
    mg.add_argument("source", help="NAME@vN, or a finished fine-tune's job id")
    mg.add_argument("--out", help="the merged model's folder (default: the models root, NAME-vN-merged)")
    mg.add_argument("--wait", action="store_true", help="wait for the job to end and print its outcome")
    mg.set_defaults(handler=run_merge)
    qz = fsub.add_parser("quantize", parents=[sub.common], help="quantize a model folder to AWQ W4A16 (a job)")
    qz.add_argument("model", help="a model folder (a merged model)")
    qz.add_argument("--method", choices=["awq"], default="awq")
    qz.add_argument("--calibration", required=True, metavar="JSONL", help="examples in the fine-tune dataset formats")
    qz.add_argument("--samples", type=int, default=64, help="calibration examples to use")
    qz.add_argument("--gpus", help="GPU indices (default: cpu)")
    qz.add_argument("--out", help="default: MODEL-awq beside it")
    qz.add_argument("--wait", action="store_true")
    qz.set_defaults(handler=run_quantize)


def _err(msg: str) -> int:
    print(f"fleetdeck finetune: {msg}", file=sys.stderr)
    return 2


def _spec(path: str) -> JobSpec:
    from engine.finetune.spec import load_spec

    return load_spec(path)


def run_check(args: argparse.Namespace) -> int:
    from engine.finetune.dataset import check_dataset
    from engine.finetune.jobs import JobError, training_estimate
    from store.config_files import ConfigError

    try:
        spec = _spec(args.spec)
    except ConfigError as exc:
        return _err(str(exc))
    report = check_dataset(Path(spec.dataset), Path(spec.base_model), spec.max_seq_length)
    try:
        estimate = training_estimate(spec).to_json()
    except JobError as exc:
        estimate = {"error": str(exc)}
    if args.json:
        print(json.dumps({"dataset": report.to_json(), "vram": estimate}, indent=2))
        return 0 if report.ok else 1
    print(f"dataset {report.path}: {report.examples} examples ({report.form or 'n/a'}) of {report.lines} lines")
    for e in report.errors:
        print(f"  {e}")
    if report.token_stats:
        t = report.token_stats
        share = report.truncated_share  # measured whenever the tokens are (a spec always has a max_seq_length)
        cut = "" if share is None else f"; {share * 100:.1f}% longer than max_seq_length {spec.max_seq_length}"
        print(f"  tokens per example: min {t['min']}, median {t['p50']}, p95 {t['p95']}, max {t['max']}{cut}")
    if "error" in estimate:
        print(f"VRAM: {estimate['error']}")
    else:
        gib = 1024**3
        print(f"VRAM estimate: {estimate['total_bytes'] / gib:.1f} GiB (weights {estimate['weights_bytes'] / gib:.1f}, "
              f"LoRA {estimate['lora_params'] / 1e6:.1f} M params, optimizer {estimate['optimizer_bytes'] / gib:.2f}, "
              f"activations {estimate['activation_bytes'] / gib:.2f}, overhead {estimate['overhead_bytes'] / gib:.1f})")
    return 0 if report.ok else 1


@mutating("job.start", lambda a: a.spec)
def run_start(args: argparse.Namespace) -> int:
    from engine.finetune import jobs
    from fleetdeck.cmdutil import fleet_config_of
    from store.config_files import ConfigError

    if args.node:  # SPEC is a spec name there, checked and planned there (with --slurm: by its own Slurm)
        return _start_on_node(args)
    try:
        spec = _spec(args.spec)
        config = fleet_config_of(args)
    except ConfigError as exc:
        return _err(str(exc))
    if args.slurm:
        return _start_slurm(args, spec, config)
    if args.partition or args.time:
        return _err("--partition and --time go with --slurm")
    snaps = None
    gpus = None  # list[int] | None, as in the --node branch above
    if args.gpus.strip().lower() != "cpu":
        from engine.vllm.profile import parse_gpus
        from fleetdeck.cmd_serve import check_host_gpus, gpu_snapshots

        try:
            gpus = parse_gpus(args.gpus)
            snaps, why = gpu_snapshots(gpus, args.simulated)
            if snaps is None and not args.simulated:
                check_host_gpus(gpus)  # forced or not, only GPUs this host has
        except ValueError as exc:
            return _err(str(exc))
        if snaps is None and not args.force:
            return _err(f"cannot check the GPUs: {why} (--force starts anyway)")
    elif spec.backend == "unsloth":
        return _err("the unsloth backend needs a GPU; use backend = \"peft\" to train on CPU")
    try:
        rec = local_ops(args).start_spec(spec, gpus, gpu_snapshots=snaps, force=args.force)
    except jobs.JobError as exc:
        return _err(str(exc))
    if _printed_json(args, rec):
        return 0
    print(f"started {rec.id} (pid {rec.pid}) on {rec.gpus}; log {rec.log_path}")
    return 0


def _printed_json(args: argparse.Namespace, rec: Any) -> bool:
    """`--json`: the record as its node wrote it, with the id that node knows it by."""
    if not getattr(args, "json", False):
        return False
    doc = rec.to_json()
    doc["id"] = own_id(rec.id)
    print(json.dumps(doc, indent=2))
    return True


def _slurm_ask(args: argparse.Namespace) -> Any:
    from fleet.protocol import slurm_ask

    if not args.gpus.strip().isdigit():
        raise ValueError(f"with --slurm, --gpus is how many GPUs to ask Slurm for (1, 2, ...), got {args.gpus!r}")
    return slurm_ask(int(args.gpus), args.partition, args.time)  # a ValueError in one line naming the field


def _start_on_node(args: argparse.Namespace) -> int:
    from engine.vllm.profile import parse_gpus

    try:
        if args.slurm:
            ask, gpus = _slurm_ask(args), None
        else:
            if args.partition or args.time:
                return _err("--partition and --time go with --slurm")
            ask, gpus = None, None if args.gpus.strip().lower() == "cpu" else parse_gpus(args.gpus)
        with ops_of(args) as ops:
            rec = ops.start_job(args.spec, gpus, force=args.force, slurm=ask)
    except node_errors() as exc:
        return _err(str(exc))
    if _printed_json(args, rec):
        return 0
    if rec.slurm is not None:
        print(f"submitted {own_id(rec.id)} on {args.node} to Slurm as job {rec.slurm.id} ({args.gpus} GPU)")
    else:
        print(f"started {own_id(rec.id)} on {args.node} (pid {rec.pid}) on {rec.gpus}; log {rec.log_path}")
    return 0


def _start_slurm(args: argparse.Namespace, spec: JobSpec, config: FleetConfig) -> int:
    from engine.finetune import jobs
    from engine.slurm.client import check_time

    if not config.slurm.enabled:
        return _err("Slurm is not configured: set [slurm] enabled = true (and partition, account, qos as the site "
                    "needs) in the fleet config")
    try:
        ask = _slurm_ask(args)
        rec = local_ops(args).start_spec(spec, None, force=args.force, slurm=ask)
    except (ValueError, jobs.JobError) as exc:
        return _err(str(exc))
    assert rec.slurm is not None
    if _printed_json(args, rec):
        return 0
    print(f"submitted {rec.id} to Slurm as job {rec.slurm.id} ({args.gpus} GPU); log {rec.log_path}")
    return 0


def run_ls(args: argparse.Namespace) -> int:
    from engine.finetune import jobs

    if args.node:
        try:
            with ops_of(args) as ops:
                recs = [p.rec for p in ops.jobs()]
        except node_errors() as exc:
            return _err(str(exc))
        for r in recs:  # the node's own ids, as `finetune cancel ID --node NODE` takes them
            r.id = own_id(r.id)
    else:
        store = listing_store_of(args)
        recs = [jobs.refresh(store, r) for r in jobs.list_jobs(store)] if store is not None else []
    if args.json:
        print(json.dumps([r.to_json() for r in recs], indent=2))
        return 0
    if not recs:
        print("no jobs (start one with `fleetdeck finetune start SPEC --gpus 0`)")
        return 0
    rows = []
    for r in recs:
        p = jobs.last_step(r)
        prog = f"step {p['step']}/{p['total_steps']} loss {p['loss']:.4f}" if p and p.get("loss") is not None else "no steps yet"
        rows.append([r.id, r.state, r.gpus, prog, r.reason or ""])
    print_table(["job", "state", "GPUs", "progress", "note"], rows)
    return 0


def _act(args: argparse.Namespace, what: str) -> int:
    try:
        with ops_of(args) as ops:
            rec = ops.cancel_job(args.id) if what == "cancel" else ops.resume_job(args.id)
    except node_errors() as exc:
        return _err(str(exc))
    if _printed_json(args, rec):
        return 0
    print(f"{own_id(rec.id)}: {rec.state}" + (f" ({rec.reason})" if rec.reason else ""))
    return 0


@mutating("job.cancel", lambda a: a.id)
def run_cancel(args: argparse.Namespace) -> int:
    return _act(args, "cancel")


@mutating("job.resume", lambda a: a.id)
def run_resume(args: argparse.Namespace) -> int:
    return _act(args, "resume")


@mutating("job.prune", lambda a: "ended jobs")
def run_prune(args: argparse.Namespace) -> int:
    from engine.nodes.ops import pruned

    try:
        with ops_of(args) as ops:
            print(pruned("jobs", ops.prune_jobs()))
    except node_errors() as exc:
        return _err(str(exc))
    return 0


def run_logs(args: argparse.Namespace) -> int:
    try:
        with ops_of(args, create=False) as ops:
            print(log_text(ops.tail_log("job", args.id, args.n)))
    except node_errors() as exc:
        return _err(str(exc))
    return 0


def _models_root(config: FleetConfig) -> Path:
    from store.paths import data_dir

    return config.models.root or data_dir() / "models"


def _wait_job(store: Store, rec: JobRecord) -> int:
    import time

    from engine.finetune import jobs

    while rec.state == jobs.JobState.RUNNING:
        time.sleep(0.5)
        rec = jobs.refresh(store, rec)
    print(f"{rec.id}: {rec.state} ({rec.reason})")
    return 0 if rec.state == jobs.JobState.FINISHED else 1


@mutating("model.merge", lambda a: a.source)
def run_merge(args: argparse.Namespace) -> int:
    from engine.adapters import registry as adapters
    from engine.adapters.registry import integrity_problem
    from engine.finetune import jobs
    from fleetdeck.cmdutil import fleet_config_of

    config = fleet_config_of(args)
    store = _store(args)
    roots = list(config.adapter_roots)
    try:
        if "@" not in args.source and not any(a.family == args.source for a in adapters.scan(roots)[0]):
            job = jobs.refresh(store, jobs.get(store, args.source))
            if not job.outputs.adapter_path:
                return _err(f"{job.id} is {job.state}, with no adapter to merge")
            adapter = adapters.read_adapter(Path(job.outputs.adapter_path))
        else:
            adapter = adapters.by_name(roots, args.source)
        problem = integrity_problem(adapter)
        if problem:
            return _err(problem)
        base = (adapter.metadata or {}).get("base_model") or adapter.base_model
        if not base or not (Path(base) / "config.json").is_file():
            return _err(f"{adapter.name}'s base model {base!r} is not a local model folder here (merging needs it)")
        out = Path(args.out).expanduser() if args.out else _models_root(config) / f"{adapter.name.replace('@', '-')}-merged"
        rec = jobs.start_transform(store, "merge", adapter.name, ["--adapter", adapter.path, "--base", str(base)], out,
                                   params={"adapter": adapter.name, "base": str(base)})
    except (adapters.AdapterError, jobs.JobError) as exc:
        return _err(str(exc))
    print(f"started {rec.id}: merging {adapter.name} into {base} -> {out}")
    return _wait_job(store, rec) if args.wait else 0


@mutating("model.quantize", lambda a: a.model)
def run_quantize(args: argparse.Namespace) -> int:
    from engine.finetune import jobs
    from engine.vllm.profile import parse_gpus
    from fleetdeck.cmdutil import fleet_config_of

    config = fleet_config_of(args)
    model = Path(args.model).expanduser()
    if not (model / "config.json").is_file():
        return _err(f"{model} is not a model folder (no config.json)")
    calib = Path(args.calibration).expanduser()
    if not calib.is_file():
        return _err(f"calibration set {calib} not found")
    python = config.models.quantize_python
    if python is None:
        return _err("no llm-compressor environment: make one (`python3 -m venv q && q/bin/pip install torch llmcompressor`)"
                    " and set [models] quantize_python in the fleet config to its python")
    if not python.is_file():
        return _err(f"[models] quantize_python {python} does not exist")
    if not 1 <= args.samples <= 100_000:
        return _err("--samples must be 1-100000")
    try:
        gpus = parse_gpus(args.gpus) if args.gpus and args.gpus != "cpu" else None
    except ValueError as exc:
        return _err(str(exc))
    out = Path(args.out).expanduser() if args.out else model.with_name(f"{model.name}-awq")
    store = _store(args)
    try:
        rec = jobs.start_transform(store, "quantize", model.name, ["--model", str(model), "--dataset", str(calib),
                                   "--samples", str(args.samples)], out, python=str(python), gpus=gpus,
                                   params={"model": str(model), "method": args.method})
    except jobs.JobError as exc:
        return _err(str(exc))
    print(f"started {rec.id}: AWQ W4A16 of {model} -> {out}")
    return _wait_job(store, rec) if args.wait else 0
