"""One app factory for the UI tests and snapshots (the Posting way)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from fleet.config import FleetConfig
from fleet.simulated import demo_fleet
from tui.app import AppOptions, FleetDeckApp

FIXED_NOW = 1_790_000_000.0


def make_app(
    sources_factory: Callable[[], list] | None = None,
    store_path: Path | None = None,
    simulated: bool = True,
    show_clock: bool = False,
) -> FleetDeckApp:
    factory = sources_factory or (lambda: list(demo_fleet(clock=lambda: FIXED_NOW)))
    return FleetDeckApp(
        AppOptions(
            sources_factory=factory,
            store_path=store_path,
            config=FleetConfig(),
            simulated=simulated,
            poll=False,
            show_clock=show_clock,
        )
    )


async def ready(app: FleetDeckApp, pilot) -> None:
    """Wait until the sources are open, then take one poll synchronously."""
    await pilot.pause()
    await drain(app)
    await pilot.pause()
    app.poll_once_sync()
    await pilot.pause()


def static_text(widget) -> str:
    """The text a Static shows, whether it holds markup or a Rich renderable."""
    from rich.console import Console

    content = widget.content
    if isinstance(content, str):
        from rich.text import Text

        return Text.from_markup(content).plain
    console = Console(width=160, record=True, file=open("/dev/null", "w"))
    console.print(content)
    return console.export_text()


async def drain(app) -> None:
    """Wait for the workers running now. One cancelled meanwhile (an exclusive worker replaced by a newer
    one, as a reload does) is not an error here: its replacement is among those waited for."""
    from textual.worker import WorkerCancelled, WorkerState

    for worker in list(app.workers):
        if worker.state == WorkerState.PENDING:
            continue
        try:
            await worker.wait()
        except WorkerCancelled:
            pass


async def settle(app, pilot, rounds: int = 3) -> None:
    """Let the app run its messages and current workers a few times (for what follows from a key press).
    Where the test then needs a particular result, wait for it with `until`, not with more rounds."""
    for _ in range(rounds):
        await pilot.pause()
        await drain(app)
    await pilot.pause()


async def until(app, pilot, cond, what: str = "") -> None:
    """Let the app run (its messages and workers) until `cond()` holds. A worker may start another (a
    load then a reload), so no fixed number of rounds is enough on a slow machine; the ceiling is only
    a safety net so that a real hang fails the test instead of stalling it."""
    import time

    from tests.helpers import WAIT_CEILING_S

    deadline = time.monotonic() + WAIT_CEILING_S
    while not cond():
        assert time.monotonic() < deadline, f"never happened: {what or cond}"
        await pilot.pause(0.02)
        await drain(app)


async def open_screen(app: FleetDeckApp, pilot, key: str, cls: type) -> object:
    """Press a top-level screen's key, let its first load land, and return it (asserting its class)."""
    await ready(app, pilot)
    await pilot.press(key)
    await settle(app, pilot)
    assert isinstance(app.screen, cls), app.screen
    return app.screen


async def open_dialog(app: FleetDeckApp, pilot, screen_key: str, key: str, cls: type, rounds: int = 3) -> Any:
    """Open a top-level screen (`screen_key`), press the key of one of its dialogs, let the dialog's first reads
    land (`rounds` of settling), and return it (asserting its class)."""
    await ready(app, pilot)
    await pilot.press(screen_key)
    await settle(app, pilot)
    await pilot.press(key)
    await settle(app, pilot, rounds)
    assert isinstance(app.screen, cls), app.screen
    return app.screen


async def press_and_confirm(app: FleetDeckApp, pilot, key: str) -> None:
    """Press an action's key, check that it asks first, and say yes."""
    from tui.screens.confirm import ConfirmScreen

    await pilot.press(key)
    # A question may come from a worker that first reads something.
    await until(app, pilot, lambda: isinstance(app.screen, ConfirmScreen), f"a question after {key!r}")
    await pilot.press("y")


def seeded_store(path: Path) -> Path:
    """A store with fixed data for the screens' snapshots: ended servers and jobs (nothing runs, nothing is
    scraped), a job's loss curve, the router's history up to FIXED_NOW, and audit records."""
    import json

    from engine.audit import trail as audit
    from engine.finetune.jobs import JobRecord, JobState
    from engine.managed import LocalGpus, parse_placement
    from engine.router.demo import backfill
    from engine.vllm.record import ServerRecord, ServerState
    from store.db import open_store

    store = open_store(path)
    common = dict(pid=None, create_time=None, argv=[], env={}, started_at=FIXED_NOW - 3600, ended_at=FIXED_NOW - 600)
    for sid, node, state, gpus, reason in (
        ("mistral-7b-awq-e68a77", "sim-h100-01", "stopped", "0", "stopped by the operator"),
        ("qwen3-8b-d673f2", "sim-h100-01", "crashed", "1",
         "CUDA out of memory while loading the weights: lower gpu_memory_utilization or max_model_len"),
        ("llama-3.2-3b-736f51", "sim-a10-02", "stopped", "0,1", "stopped by the operator"),
    ):
        ServerRecord(id=sid, name=sid.rsplit("-", 1)[0], node=node, gpus=parse_placement(gpus), port=8000,
                     log_path=f"/var/log/fleetdeck/{sid}.log", spec={"model": sid.rsplit("-", 1)[0]}, state=ServerState(state),
                     reason=reason, **common).save(store)
    workdir = path.parent / "ft-tickets-v5-1a2b3c"
    workdir.mkdir(exist_ok=True)
    events = [{"event": "step", "step": s, "total_steps": 600, "loss": 2.4 - 0.003 * s, "learning_rate": 2e-4,
               "tokens_per_s": 5120.0, "elapsed_s": s * 3.0, "eta_s": (600 - s) * 3.0} for s in range(1, 301, 10)]
    (workdir / "progress.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    for jid, state, reason, wd in (
        ("ft-tickets-v5-1a2b3c", "cancelled", "cancelled at step 291; `fleetdeck finetune resume` continues",
         str(workdir)),
        ("ft-triage-v2-4d5e6f", "failed", "dataset error: run `fleetdeck finetune check SPEC`.", "/nonexistent"),
    ):
        JobRecord(id=jid, name=jid.rsplit("-", 1)[0], node="sim-h100-01", gpus=LocalGpus((2,)), port=None,
                  log_path=f"/var/log/fleetdeck/{jid}.log", spec={"backend": "peft", "base_model": "/models/Qwen3-8B",
                                                                  "dataset": "/data/tickets.jsonl", "lora_rank": 16,
                                                                  "lora_alpha": 32, "load_in_4bit": True},
                  state=JobState(state), reason=reason, workdir=wd, **common).save(store)
    backfill(store, FIXED_NOW, days=30, daily_only_days=60, minute_hours=1.0)
    for i, (action, target, outcome, reason) in enumerate((
        ("server.start", "mistral-7b-awq-e68a77", "done", None),
        ("server.stop", "mistral-7b-awq-e68a77", "done", None),
        ("job.start", "ft-tickets-v5-1a2b3c", "done", None),
        ("adapter.load", "too-wide", "refused", "rank 128 is above the server's max LoRA rank 16"),
        ("process.kill", "sim-h100-01:4242", "refused", "sim-h100-01 is a simulated node"),
    )):
        audit.append(store, action, target, outcome, reason, source="tui", node="sim-h100-01",
                     who={"actor": "ops", "origin": "local", "key_fingerprint": None}, ts=FIXED_NOW - 3000 + 60 * i)
    store.close()
    return path
