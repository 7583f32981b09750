"""`fleetdeck serve ...`: the same functions the Servers screen calls."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from fleetdeck.argtypes import number
from fleetdeck.cmdutil import err as _err
from fleetdeck.cmdutil import store_of as _store
from fleetdeck.cmdutil import fleet_config_of as _fleet_config
from fleetdeck.cmdutil import listing_store_of
from fleetdeck.mutating import mutating
from fleetdeck.node_cli import log_text, local_ops, node_errors, node_option, ops_of, own_id
from fleetdeck.tables import print_table

if TYPE_CHECKING:
    from engine.kvfit.plan import FitResult
    from engine.vllm.record import ServerRecord
    from fleet.model import GpuSnapshot
    from store.db import Store


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="start, list, stop vLLM servers")
    ssub = serve.add_subparsers(dest="serve_cmd", metavar="ACTION", required=True)
    st = ssub.add_parser("start", parents=[sub.common], help="start a server from a launch profile")
    st.add_argument("profile", help="profile name (in the profile folders) or a .toml path")
    st.add_argument("--gpus", required=True, help="GPU indices, e.g. 0 or 0,1")
    st.add_argument("--port", type=int)
    st.add_argument("--force", action="store_true", help="start even if the planner or the GPUs say it will fail")
    st.add_argument("--dry-run", action="store_true", help="print the command, environment and verdict; start nothing")
    st.add_argument("--simulated", action="store_true", help="plan against the simulated fleet's first node")
    st.add_argument("--wait", action="store_true", help="wait until it is ready (or crashed)")
    st.add_argument("--node", help="start it on this node of the fleet config (over SSH, through its agent; PROFILE "
                    "is then a profile name there, planned there)")
    st.add_argument("--slurm", action="store_true", help="submit it to the site's Slurm as a long-running job "
                    "(with --node: that node's Slurm); --gpus is then a count")
    st.add_argument("--partition", help="with --slurm: the partition")
    st.add_argument("--time", help="with --slurm: the time limit (a server past it is ended by Slurm)")
    st.set_defaults(handler=run_start)
    ls = ssub.add_parser("ls", parents=[sub.common], help="servers fleetdeck started, with their state")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--node", help="list the servers of this node of the fleet config")
    ls.add_argument("--interval", type=number(0, 60, what="seconds"), default=1.0,
                    help="seconds between the two /metrics scrapes that rates come from (0: no rates)")
    ls.set_defaults(handler=run_ls)
    sh = ssub.add_parser("show", parents=[sub.common], help="one server: state, diagnosis, live figures, adapters")
    sh.add_argument("id")
    sh.add_argument("--json", action="store_true")
    sh.add_argument("--interval", type=number(0, 60, what="seconds"), default=1.0)
    sh.add_argument("--node", help="a server of this node of the fleet config (figures as its agent last read them)")
    sh.set_defaults(handler=run_show)
    sp = ssub.add_parser("stop", parents=[sub.common], help="stop a server (SIGTERM, then SIGKILL)")
    sp.add_argument("id")
    sp.add_argument("--json", action="store_true", help="print the stopped server's record")
    node_option(sp)
    sp.set_defaults(handler=run_stop)
    rs = ssub.add_parser("restart", parents=[sub.common],
                         help="a new run of a server's profile on the same GPUs (or Slurm ask); a running one is stopped first")
    rs.add_argument("id")
    node_option(rs)
    rs.set_defaults(handler=run_restart)
    lg = ssub.add_parser("logs", parents=[sub.common], help="the tail of a server's log")
    lg.add_argument("id")
    lg.add_argument("-n", type=int, default=60)
    node_option(lg)
    lg.set_defaults(handler=run_logs)
    pr = ssub.add_parser("prune", parents=[sub.common],
                         help="forget stopped and crashed servers (their logs stay on disk)")
    node_option(pr)
    pr.set_defaults(handler=run_prune)


def check_host_gpus(indices: list[int]) -> None:
    """ValueError unless this host has GPUs at these indices. Without NVML there is no plan (a start needs
    --force), but the GPUs named must still be ones the host has (its driver's list, fleet/inventory.py),
    forced or not: an index CUDA does not have is refused, as a node's agent refuses it."""
    from fleet.inventory import check_gpus
    from fleet.source import snapshot_here

    check_gpus(snapshot_here(), indices)


def gpu_snapshots(indices: list[int], simulated: bool) -> tuple[list[GpuSnapshot] | None, str | None]:
    if simulated:
        from fleet.simulated import demo_fleet

        snap = demo_fleet()[0].snapshot()
    else:
        from fleet.source import snapshot_here

        snap = snapshot_here()
        if snap.nvml != "ok":
            return None, snap.reason
    try:
        return snap.gpus_at(indices), None
    except ValueError as exc:
        return None, str(exc)


@mutating("server.start", lambda a: a.profile, lambda a: not a.dry_run)
def run_start(args: argparse.Namespace) -> int:
    import shlex

    from engine.vllm.command import (LaunchError, build_launch, check_exposure, choose_port, listen_host, preflight,
                                     resolve_preload, vllm_installed)
    from engine.vllm.profile import find_profile, load_profile, parse_gpus, profile_roots
    from store.config_files import ConfigError
    from engine.kvfit.text import render_text

    if args.slurm:
        return _start_slurm(args)
    if args.partition or args.time:
        return _err("--partition and --time go with --slurm")
    try:
        gpus = parse_gpus(args.gpus)
        config = _fleet_config(args)
        # A node starts only the profiles in its own folders, by name: nothing from here is run there.
        profile = None if args.node else load_profile(find_profile(args.profile, profile_roots()))
    except (ValueError, FileNotFoundError, ConfigError) as exc:
        return _err(str(exc))
    if args.node:
        if args.simulated:
            return _err("--node starts there, planned by that node: not with --simulated")
        try:
            with ops_of(args) as ops:
                if args.dry_run:  # the node's own plan (its agent's read-only plan_server): nothing started
                    print(f"planned by {args.node}, on its own profile and GPUs:\n"
                          + render_text(ops.plan_server(args.profile, gpus).verdict))
                    return 0
                started = ops.start_server(args.profile, gpus, port=args.port, force=args.force)
        except node_errors() as exc:
            return _err(str(exc))
        srv = started.rec
        print(f"started {own_id(srv.id)} on {args.node} (pid {srv.pid}) on GPUs {srv.gpus}, port {srv.port}")
        return 0
    assert profile is not None
    snaps, why = gpu_snapshots(gpus, args.simulated)
    if snaps is None and not args.simulated and profile.cpu_kv_cache_bytes is None and not args.dry_run:
        try:  # vLLM's CPU build runs on no GPU: its indices are nominal, and a host running it may have none
            check_host_gpus(gpus)
        except ValueError as exc:
            return _err(str(exc))
    if args.dry_run:
        try:
            check_exposure(profile, listen_host(profile))
            lora = resolve_preload(profile, list(config.adapter_roots)) if profile.lora.enable else {}
            # A dry run only prints the command: it works where vLLM is not installed (planning on a laptop).
            argv, env = build_launch(profile, gpus, args.port or (8000 if profile.port == "auto" else choose_port(profile.port)),
                                     lora, require_installed=False)
            verdict = preflight(profile, snaps or []) if snaps or profile.cpu_kv_cache_bytes else None
        except LaunchError as exc:
            return _err(str(exc))
        print("command:", shlex.join(argv))
        if not vllm_installed(argv):
            print(f"note: {argv[0]!r} is not installed here; a real start needs it (FLEETDECK_VLLM or the "
                  "profile's vllm_command points at it)", file=sys.stderr)
        print("environment:", " ".join(f"{k}={'***' if k == 'VLLM_API_KEY' else v}" for k, v in env.items()))
        print(render_text(verdict) if verdict else f"planner: GPUs not checked ({why})")
        return 0
    try:
        ops = local_ops(args)
        started = ops.start_profile(profile, gpus, gpu_snapshots=snaps, port=args.port, force=args.force)
    except LaunchError as exc:
        if snaps is None and why:
            return _err(f"{exc}\n  GPUs: {why}")
        return _err(str(exc))
    rec = started.rec
    print(f"started {rec.id} (pid {rec.pid}) on GPUs {rec.gpus}, port {rec.port}; log {rec.log_path}")
    if rec.reason:
        print(f"warning: {rec.reason}", file=sys.stderr)
    return _planned_and_ready(ops.store, rec, started.verdict, args.wait)


def _start_slurm(args: argparse.Namespace) -> int:
    """`--slurm`: this host's Slurm (a profile name or file here), or with `--node` that node's (a login
    node submitting for the dashboard: a profile name there)."""
    from engine.vllm.command import LaunchError
    from engine.vllm.profile import find_profile, load_profile, profile_roots
    from fleet.protocol import slurm_ask
    from store.config_files import ConfigError

    if args.dry_run or args.simulated:
        return _err("--slurm submits to Slurm: not with --dry-run or --simulated")
    if not args.gpus.strip().isdigit() or not 1 <= int(args.gpus) <= 64:
        return _err(f"with --slurm, --gpus is how many GPUs to ask Slurm for (1-64), got {args.gpus!r}")
    try:
        ask = slurm_ask(int(args.gpus), args.partition, args.time)
    except ValueError as exc:  # one line naming the flag's field
        return _err(str(exc))
    if args.node:
        try:
            with ops_of(args) as ops:
                started = ops.start_server(args.profile, [], port=args.port, force=args.force, slurm=ask)
        except node_errors() as exc:
            return _err(str(exc))
        rec = started.rec
        print(f"submitted {own_id(rec.id)} on {args.node} to Slurm as job "
              f"{rec.slurm.id if rec.slurm else '?'} ({args.gpus} GPU), port {rec.port}")
        return 0
    try:
        config = _fleet_config(args)
        profile = load_profile(find_profile(args.profile, profile_roots()))
    except (ValueError, FileNotFoundError, ConfigError) as exc:
        return _err(str(exc))
    if not config.slurm.enabled:
        return _err("Slurm is not configured: set [slurm] enabled = true in the fleet config")
    ops = local_ops(args)
    try:
        started = ops.start_profile(profile, [], port=args.port, force=args.force, slurm=ask)
    except (LaunchError, ValueError) as exc:
        return _err(str(exc))
    rec = started.rec
    assert rec.slurm is not None
    print(f"submitted {rec.id} to Slurm as job {rec.slurm.id} ({args.gpus} GPU), port {rec.port}; "
          f"log {rec.log_path}")
    return _planned_and_ready(ops.store, rec, started.verdict, args.wait)


def _planned_and_ready(store: Store, rec: ServerRecord, verdict: dict[str, Any] | None, wait: bool) -> int:
    """What the planner promised the server (its verdict's JSON), and (with --wait) whether it came up."""
    from engine.vllm.launcher import wait_ready
    from engine.vllm.record import ServerState

    if verdict is not None:
        print(f"planner: {verdict['kv_tokens']:,} KV tokens, {verdict['max_concurrency']:.2f}x at "
              f"{verdict['max_model_len']:,} tokens" + ("" if verdict["fits"] else f" (forced past: {verdict['reason']})"))
    if wait:
        rec = wait_ready(store, rec)
        print(f"{rec.id}: {rec.state}" + (f": {rec.reason}" if rec.reason else ""))
        return 0 if rec.state == ServerState.READY else 1
    return 0


def run_ls(args: argparse.Namespace) -> int:
    from engine.vllm.record import ServerState
    from engine.vllm.status import statuses

    if args.node:
        try:
            with ops_of(args) as ops:
                views = ops.servers()
        except node_errors() as exc:
            return _err(str(exc))
        for v in views:  # the node's own ids, as `serve stop ID --node NODE` takes them
            v.rec.id = own_id(v.rec.id)
    else:
        store = listing_store_of(args)
        views = statuses(store, interval=args.interval) if store is not None else []
    if args.json:
        print(json.dumps([v.to_json() for v in views], indent=2))
        return 0
    if not views:
        print("no servers (start one with `fleetdeck serve start PROFILE --gpus 0`)")
        return 0
    rows = []
    for v in views:
        r, f = v.rec, v.figures
        live = ["", "", ""]
        if f is not None:
            live = [_num(f.generation_tps), f"{_num(f.running, '{:.0f}')}/{_num(f.waiting, '{:.0f}')}",
                    _num(None if f.kv_usage is None else f.kv_usage * 100, "{:.1f}%")]
        rows.append([r.id, r.state, r.served_name, r.gpus, r.port, *live,
                     r.reason if r.reason and r.state != ServerState.STOPPED else ""])
    print_table(["server", "state", "model", "GPUs", "port", "gen tok/s", "run/wait", "KV", "note"], rows,
                right={"port", "gen tok/s", "run/wait", "KV"})
    return 0


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def run_show(args: argparse.Namespace) -> int:
    from engine.vllm.command import LaunchError
    from engine.vllm.launcher import get
    from engine.vllm.status import statuses

    if args.node:
        try:
            with ops_of(args) as ops:
                found = [v for v in ops.servers() if own_id(v.rec.id) == args.id]
        except node_errors() as exc:
            return _err(str(exc))
        if not found:
            return _err(f"no server {args.id!r} on {args.node} (fleetdeck serve ls --node {args.node})")
        view = found[0]
        view.rec.id = own_id(view.rec.id)
    else:
        store = _store(args, create=False)
        try:
            rec = get(store, args.id)
        except LaunchError as exc:
            return _err(str(exc))
        (view,) = statuses(store, interval=args.interval, ids=[rec.id])
    if args.json:
        print(json.dumps(view.to_json(), indent=2))
        return 0
    r, f = view.rec, view.figures
    print(f"{r.id}: {r.state}  {r.served_name}  GPUs {r.gpus}  {r.base_url}  pid {r.pid}")
    if r.reason:
        print(f"  {r.reason}")
    print(f"  log {r.log_path}")
    if f is not None:
        def ms(x: float | None) -> str:
            return "n/a" if x is None else f"{x * 1000:.0f} ms"

        print(f"  generation {_num(f.generation_tps)} tok/s, prompt {_num(f.prompt_tps)} tok/s, "
              f"running {_num(f.running, '{:.0f}')}, waiting {_num(f.waiting, '{:.0f}')}")
        print(f"  KV cache use {_num(None if f.kv_usage is None else f.kv_usage * 100)}%, allocated "
              f"{f.kv_tokens if f.kv_tokens is not None else 'n/a'} tokens, planned "
              f"{r.predicted_kv_tokens if r.predicted_kv_tokens is not None else 'n/a'}")
        from engine.vllm.status import kv_disagreement

        apart = kv_disagreement(f.kv_tokens, r.predicted_kv_tokens)
        if apart:
            print(f"  warning: allocated and planned KV cache are {apart:.1f}x apart: the plan does not describe this "
                  "server (another vLLM version, other settings, or another process on its GPU)")
        print(f"  TTFT p50/p95 {ms(f.ttft_p50)}/{ms(f.ttft_p95)}, end-to-end p50/p95 {ms(f.e2e_p50)}/{ms(f.e2e_p95)}, "
              f"preemptions {_num(f.preemptions, '{:.0f}')}, prefix-cache hits "
              f"{_num(None if f.prefix_hit_rate is None else f.prefix_hit_rate * 100)}%")
    if view.loaded_adapters:
        print(f"  adapters loaded: {', '.join(view.loaded_adapters)}")
    if view.error:
        print(f"  {view.error}")
    return 0


@mutating("server.stop", lambda a: a.id)
def run_stop(args: argparse.Namespace) -> int:
    try:
        with ops_of(args) as ops:
            rec = ops.stop_server(args.id)
    except node_errors() as exc:
        return _err(str(exc))
    if args.json:
        print(json.dumps({**rec.to_json(), "id": own_id(rec.id)}, indent=2))
        return 0
    print(f"{own_id(rec.id)}: stopped")
    return 0


# Audited as the stop it begins with (the start that follows is audited by the engine, or the agent, itself).
@mutating("server.stop", lambda a: a.id)
def run_restart(args: argparse.Namespace) -> int:
    from engine.nodes.ops import restarted_text

    try:
        with ops_of(args) as ops:
            done = ops.restart_server(args.id)
    except node_errors() as exc:
        return _err(str(exc))
    print(restarted_text(done))
    return 0


@mutating("server.prune", lambda a: "ended servers")
def run_prune(args: argparse.Namespace) -> int:
    from engine.nodes.ops import pruned

    try:
        with ops_of(args) as ops:
            print(pruned("servers", ops.prune_servers()))
    except node_errors() as exc:
        return _err(str(exc))
    return 0


def run_logs(args: argparse.Namespace) -> int:
    try:
        with ops_of(args, create=False) as ops:
            print(log_text(ops.tail_log("server", args.id, args.n)))
    except node_errors() as exc:
        return _err(str(exc))
    return 0
