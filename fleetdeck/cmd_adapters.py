"""`fleetdeck adapters ...`: versions on disk, loading into servers, evaluation, promotion and rollback;
the same engine functions the Servers and Router screens call."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fleetdeck.cmdutil import err as _err
from fleetdeck.cmdutil import listing_store_of
from fleetdeck.cmdutil import store_of as _store
from fleetdeck.mutating import mutating
from fleetdeck.node_cli import local_ops, node_errors, node_option, ops_of, own_id
from fleetdeck.tables import print_table


def register(sub: Any) -> None:
    ad = sub.add_parser("adapters", help="LoRA adapter versions: on disk, in servers, evaluated, promoted")
    asub = ad.add_subparsers(dest="adapters_cmd", metavar="ACTION", required=True)
    al = asub.add_parser("ls", parents=[sub.common], help="adapters in the adapter roots, and those loaded in servers")
    al.add_argument("--json", action="store_true")
    node_option(al)
    al.set_defaults(handler=run_ls)
    sh = asub.add_parser("show", parents=[sub.common], help="one version: provenance, integrity, evaluations, promotions")
    sh.add_argument("adapter", help="NAME@vN (or NAME: its newest version)")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(handler=run_show)
    im = asub.add_parser("import", parents=[sub.common], help="register a PEFT LoRA folder as the next version of NAME")
    im.add_argument("path", help="the adapter folder (adapter_config.json and its weights)")
    im.add_argument("name", help="the adapter's name; it is registered as NAME@vN")
    im.set_defaults(handler=run_import)
    # What load and swap both take besides their positionals.
    serve_as = argparse.ArgumentParser(add_help=False)
    serve_as.add_argument("--name", help="name to serve an unversioned folder under (a version is served as NAME@vN)")
    node_option(serve_as)
    ld = asub.add_parser("load", parents=[sub.common, serve_as],
                         help="load an adapter into a running server (checks compatibility)")
    ld.add_argument("server")
    ld.add_argument("adapter", help="adapter name (in the roots) or folder")
    ld.set_defaults(handler=run_load)
    ul = asub.add_parser("unload", parents=[sub.common], help="unload an adapter from a server")
    ul.add_argument("server")
    ul.add_argument("name")
    node_option(ul)
    ul.set_defaults(handler=run_unload)
    sw = asub.add_parser("swap", parents=[sub.common, serve_as], help="load a new adapter, then unload the old one (no gap)")
    sw.add_argument("server")
    sw.add_argument("old", help="the loaded adapter to replace")
    sw.add_argument("adapter", help="the new adapter: name (in the roots) or folder")
    sw.set_defaults(handler=run_swap)
    ev = asub.add_parser("eval", parents=[sub.common], help="score a version on a labelled set through a server")
    ev.add_argument("adapter", help="NAME@vN")
    ev.add_argument("--eval", required=True, metavar="FILE", help="JSONL, the calibrate format")
    ev.add_argument("--server", help="a ready server fleetdeck runs (default: the first that can serve it)")
    ev.add_argument("--task", help="score with this task's confidence method and its gate's target accuracy")
    ev.add_argument("--target-accuracy", type=float, metavar="A", help="default: the task's gate, else 0.95")
    ev.add_argument("--router-config", metavar="FILE", help="the router config (default: the usual place)")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(handler=run_eval)
    cp = asub.add_parser("compare", parents=[sub.common],
                         help="score the model a server serves (merged or quantized) against the version it came from")
    cp.add_argument("adapter", help="NAME@vN, the version the served model was made from")
    cp.add_argument("--server", required=True, help="the server serving the merged or quantized model")
    cp.add_argument("--eval", required=True, metavar="FILE", help="the same eval set the version was scored on")
    cp.add_argument("--task", help="judge against this task's gate (its target accuracy and confidence method)")
    cp.add_argument("--router-config", metavar="FILE")
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(handler=run_compare)
    pr = asub.add_parser("promote", parents=[sub.common], help="point a task at a version that passed its gate")
    pr.add_argument("task")
    pr.add_argument("adapter", help="NAME@vN")
    pr.add_argument("--router-config", metavar="FILE")
    pr.set_defaults(handler=run_promote)
    rb = asub.add_parser("rollback", parents=[sub.common], help="point a task back at what its last promotion replaced")
    rb.add_argument("task")
    rb.add_argument("--router-config", metavar="FILE")
    rb.set_defaults(handler=run_rollback)
    hi = asub.add_parser("history", parents=[sub.common], help="promotions and rollbacks, newest first")
    hi.add_argument("task", nargs="?")
    hi.add_argument("--json", action="store_true")
    hi.set_defaults(handler=run_history)


def _roots(args: argparse.Namespace) -> list[Path]:
    from fleetdeck.cmdutil import fleet_config_of

    return list(fleet_config_of(args).adapter_roots)


def _router_path(args: argparse.Namespace) -> Path:
    from store.paths import default_router_config

    return Path(args.router_config) if args.router_config else default_router_config()


def _adapter(roots: list[Path], name_or_path: str) -> Any:
    from engine.adapters import registry as adapters

    try:
        return adapters.by_name(roots, name_or_path)
    except adapters.AdapterError:
        p = Path(name_or_path).expanduser()
        if p.is_dir():
            return adapters.read_adapter(p)
        raise


def _status(adapter: Any) -> str:
    from engine.adapters.registry import integrity_problem

    if adapter.version is None:
        return "unversioned"
    return "MODIFIED" if integrity_problem(adapter) else "intact"


def _node_listing(args: argparse.Namespace) -> tuple[list[Any], list[str], dict[str, list[str]], dict[str, Any]]:
    """A node's adapters as its agent lists them: on disk (integrity, latest accuracy), and loaded in each
    of its ready servers."""
    with ops_of(args) as ops:
        listing = ops.adapters(None)
        loaded: dict[str, list[str]] = {}
        problems = list(listing.problems)
        for st in ops.servers():
            if st.rec.state == "ready":
                of = ops.adapters(st.rec.id)
                loaded[own_id(st.rec.id)] = of.loaded
                problems += [p for p in of.problems if p not in problems]
    latest = {name: {"accuracy": acc} for name, acc in listing.accuracy.items()}
    status = {a.name: ("unversioned" if a.version is None else "MODIFIED" if listing.integrity.get(a.name) else "intact")
              for a in listing.adapters}
    return listing.adapters, problems, loaded, {"latest": latest, "status": status}


def run_ls(args: argparse.Namespace) -> int:
    from engine.adapters import registry as adapters
    from engine.adapters.evaluation import evals_of
    from engine.vllm.launcher import list_servers, refresh
    from engine.vllm.record import ServerState

    if args.node:
        try:
            on_node, node_problems, node_loaded, seen = _node_listing(args)
        except node_errors() as exc:
            return _err(str(exc))
        return _print_ls(args, on_node, node_problems, node_loaded, seen["latest"], seen["status"])
    found, problems = adapters.scan(_roots(args))
    store = listing_store_of(args)  # adapters on disk are listed on a fresh install too
    servers = [refresh(store, r) for r in list_servers(store, include_ended=False)] if store is not None else []
    loaded: dict[str, list[str]] = {}
    for s in servers:
        if s.state == ServerState.READY:
            try:
                loaded[s.id] = [m["id"] for m in adapters.loaded(s.base_url, s.api_key)]
            except Exception as exc:  # a server that stopped answering
                problems.append(f"{s.id}: cannot list loaded adapters ({exc})")
    latest: dict[str, dict[str, Any]] = {}
    for e in reversed(evals_of(store) if store is not None else []):
        latest[e["adapter"]] = e
    return _print_ls(args, found, problems, loaded, latest, {a.name: _status(a) for a in found})


def _print_ls(args: argparse.Namespace, found: list[Any], problems: list[str], loaded: dict[str, list[str]],
              latest: dict[str, dict[str, Any]], status: dict[str, str]) -> int:
    docs = []
    for a in found:
        doc = a.to_json()
        doc.update(status=status[a.name], latest_eval=latest.get(a.name))
        docs.append(doc)
    if args.json:
        print(json.dumps({"adapters": docs, "loaded": loaded, "problems": problems}, indent=2))
        return 0
    rows = []
    for a, doc in zip(found, docs):
        ev = doc["latest_eval"]
        on = f" on {Path(ev['eval_path']).name}" if ev and ev.get("eval_path") else ""  # a node's listing: accuracy only
        score = f"acc {ev['accuracy'] * 100:.1f}%{on}" if ev else "not evaluated"
        rows.append([a.name, a.rank, doc["status"], score, a.base_model or "n/a", f"{a.size_bytes / 1024**2:.1f} MiB"])
    if rows:
        print_table(["adapter", "rank", "status", "evaluation", "base model", "size"], rows, right={"rank", "size"})
    for a in found:
        for p in a.vllm_problems:
            print(f"{a.name}: vLLM would refuse it: {p}")
    for sid, names in loaded.items():
        print(f"loaded in {sid}: {', '.join(names) or '(none)'}")
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    return 0


def run_show(args: argparse.Namespace) -> int:
    from engine.adapters import registry as adapters
    from engine.adapters.evaluation import evals_of
    from engine.adapters.registry import integrity_problem
    from engine.adapters.promotion import history

    try:
        a = adapters.by_name(_roots(args), args.adapter)
    except adapters.AdapterError as exc:
        return _err(str(exc))
    store = listing_store_of(args)
    evals = evals_of(store, a.name) if store is not None else []
    promotions = [p for p in history(store, limit=1000) if a.name in (p["from_model"], p["to_model"])] \
        if store is not None else []
    doc = {**a.to_json(), "status": _status(a), "integrity_problem": integrity_problem(a), "evals": evals,
           "promotions": promotions}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    meta = a.metadata or {}
    print(f"{a.name}  ({doc['status']}, content {str(meta.get('content_sha256', 'n/a'))[:12]})")
    print(f"  rank {a.rank}, alpha {a.alpha}, targets {', '.join(a.target_modules)}")
    print(f"  base model {meta.get('base_model') or a.base_model} (config.json {str(meta.get('base_config_sha256'))[:12]})")
    if meta.get("dataset"):
        print(f"  dataset {meta['dataset']} (sha256 {str(meta.get('dataset_sha256'))[:12]}), final loss {meta.get('final_loss')}")
    print(f"  from {meta.get('origin', 'n/a')} {meta.get('job_id') or meta.get('source_path') or ''}, registered "
          f"{meta.get('registered_at', 'n/a')} by {meta.get('registered_by', 'n/a')}")
    if doc["integrity_problem"]:
        print(f"  {doc['integrity_problem']}")
    for e in evals:
        auroc = "n/a" if e["auroc"] is None else f"{e['auroc']:.3f}"
        print(f"  eval #{e['id']} {Path(e['eval_path']).name} ({e['items']} items): accuracy {e['accuracy'] * 100:.1f}%, "
              f"ECE {e['ece']:.3f}, AUROC {auroc}, p50 {e['p50_ms']:.0f} ms, p95 {e['p95_ms']:.0f} ms")
    for p in promotions:
        print(f"  {p['kind']} of {p['task']}: {p['from_model']} -> {p['to_model']} by {p['actor']}")
    return 0


@mutating("adapter.import", lambda a: a.name)
def run_import(args: argparse.Namespace) -> int:
    from engine.adapters.versions import import_adapter
    from engine.adapters.registry import AdapterError

    try:
        target = import_adapter(Path(args.path).expanduser(), args.name, _roots(args))
    except AdapterError as exc:
        return _err(str(exc))
    print(f"{target.name}: registered at {target}")
    return 0


@mutating("adapter.load", lambda a: a.name or a.adapter)
def run_load(args: argparse.Namespace) -> int:
    return _load_or_swap(args, old=None)


@mutating("adapter.swap", lambda a: a.name or a.adapter)
def run_swap(args: argparse.Namespace) -> int:
    return _load_or_swap(args, old=args.old)


def _load_or_swap(args: argparse.Namespace, old: str | None) -> int:
    try:
        if args.node:  # ADAPTER is a name in that node's adapter roots, never a folder sent there
            with ops_of(args) as ops:
                print(ops.load_adapter(args.server, args.adapter, args.name) if old is None
                      else ops.swap_adapter(args.server, old, args.adapter, args.name))
        else:  # this host: a name in the roots, or a folder here
            ops = local_ops(args)
            print(ops.load_adapter_from(args.server, _adapter(list(ops.adapter_roots), args.adapter), args.name, old))
    except node_errors() as exc:
        return _err(str(exc))
    return 0


@mutating("adapter.unload", lambda a: a.name)
def run_unload(args: argparse.Namespace) -> int:
    try:
        with ops_of(args) as ops:
            print(ops.unload_adapter(args.server, args.name))
    except node_errors() as exc:
        return _err(str(exc))
    return 0


def _scoring(args: argparse.Namespace) -> tuple[str, float | None] | int:
    """How `--task` scores an evaluation: its confidence method and its gate's target accuracy (mean
    token confidence and no gate without a task); an exit code when the task cannot be read."""
    from engine.router.config import load_router_config
    from store.config_files import ConfigError

    if not args.task:
        return "mean_token", None
    try:
        task = load_router_config(_router_path(args)).task_by_name(args.task)
    except ConfigError as exc:
        return _err(str(exc))
    if task is None:
        return _err(f"no task {args.task!r} in {_router_path(args)}")
    return task.confidence, (task.gate.target_accuracy if task.gate else None)


@mutating("adapter.eval", lambda a: a.adapter)
def run_eval(args: argparse.Namespace) -> int:
    from engine.adapters import registry as adapters
    from engine.adapters.evaluation import compatible_servers, evaluate
    from engine.router.calibrate import EvalSetError
    from engine.vllm.command import LaunchError
    from engine.vllm.launcher import get, refresh

    scoring = _scoring(args)
    if isinstance(scoring, int):
        return scoring
    confidence, gate = scoring
    target = args.target_accuracy if args.target_accuracy is not None else gate
    target = 0.95 if target is None else target
    if not 0 < target <= 1:
        return _err("--target-accuracy must be in (0, 1]")
    store = _store(args)
    try:
        adapter = adapters.by_name(_roots(args), args.adapter)
        if args.server:
            server = refresh(store, get(store, args.server))
        else:
            ready = compatible_servers(store, adapter)
            if not ready:
                return _err(f"no ready server can serve {adapter.name} (LoRA on, base {adapter.base_model}): start one "
                            "with `fleetdeck serve start PROFILE`, or name one with --server")
            server = ready[0]
        row = evaluate(store, adapter, server, Path(args.eval), confidence=confidence, target_accuracy=target)
    except (LaunchError, adapters.AdapterError, EvalSetError, ConnectionError) as exc:
        return _err(str(exc))
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    auroc = "n/a" if row["auroc"] is None else f"{row['auroc']:.3f}"
    print(f"{row['adapter']} on {Path(row['eval_path']).name} ({row['items']} items) through {row['server']}: "
          f"accuracy {row['accuracy'] * 100:.1f}%, ECE {row['ece']:.3f}, AUROC {auroc}")
    thr = "none meets it" if row["threshold"] is None else (
        f"threshold {row['threshold']:.4f} ({row['escalation_rate'] * 100:.1f}% escalated)")
    print(f"  target {target * 100:.1f}%: {thr}; latency p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms "
          f"(evaluation #{row['id']})")
    return 0


@mutating("adapter.eval", lambda a: f"model on {a.server}")
def run_compare(args: argparse.Namespace) -> int:
    from engine.adapters import registry as adapters
    from engine.adapters.evaluation import compare, evals_of, evaluate_served_model, file_sha256
    from engine.router.calibrate import EvalSetError
    from engine.vllm.command import LaunchError
    from engine.vllm.launcher import get, refresh

    scoring = _scoring(args)
    if isinstance(scoring, int):
        return scoring
    confidence, gate = scoring
    store = _store(args)
    try:
        adapter = adapters.by_name(_roots(args), args.adapter)
        eval_sha = file_sha256(Path(args.eval))
        content = (adapter.metadata or {}).get("content_sha256")
        base_row = next((e for e in evals_of(store, adapter.name)
                         if e["eval_sha256"] == eval_sha and e["content_sha256"] == content), None)
        if base_row is None:
            return _err(f"{adapter.name} has no evaluation on {args.eval} as it is now: run `fleetdeck adapters eval "
                        f"{adapter.name} --eval {args.eval}` first, so both are scored on the same set")
        server = refresh(store, get(store, args.server))
        row = evaluate_served_model(store, server, Path(args.eval), confidence=confidence,
                                    target_accuracy=base_row["target_accuracy"])
    except OSError as exc:
        return _err(f"{args.eval}: {exc.strerror or exc}")
    except (LaunchError, adapters.AdapterError, EvalSetError, ConnectionError) as exc:
        return _err(str(exc))
    ok, verdict = compare(row, base_row, gate)
    if args.json:
        print(json.dumps({"model": row, "adapter": base_row, "ok": ok, "verdict": verdict}, indent=2))
    else:
        print(verdict)
    return 0 if ok else 3


@mutating("adapter.promote", lambda a: a.task)
def run_promote(args: argparse.Namespace) -> int:
    return _promotion(args, rollback=False)


@mutating("adapter.rollback", lambda a: a.task)
def run_rollback(args: argparse.Namespace) -> int:
    return _promotion(args, rollback=True)


def _promotion(args: argparse.Namespace, rollback: bool) -> int:
    from engine.adapters import promotion
    from engine.adapters.registry import AdapterError
    from store.config_files import ConfigError

    store, path = _store(args), _router_path(args)
    try:
        if rollback:
            out = promotion.rollback(store, path, args.task, _roots(args))
        else:
            out = promotion.promote(store, path, args.task, args.adapter, _roots(args))
    except (promotion.PromotionError, AdapterError, ConfigError, KeyError) as exc:
        return _err(str(exc).strip("'\""))
    print("\n".join(out.lines()))
    return 0


def run_history(args: argparse.Namespace) -> int:
    from engine.adapters.promotion import history
    from tui.format import local_time

    rows = history(_store(args, create=False), args.task)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no promotions yet")
        return 0
    print_table(["when", "task", "kind", "from", "to", "by"],
                [[local_time(p["ts"], "%Y-%m-%d %H:%M"), p["task"], p["kind"], p["from_model"], p["to_model"], p["actor"]]
                 for p in rows])
    return 0
