"""Agent runs: starting, commanding and ending them. Every status change is stored with
its event (``agent.*``), then published.

A run's life: ``pending`` (created, the runner launched) → ``running`` (the runner said
hello and started) ⇄ ``paused`` → ``done`` or ``failed``. Whatever ends it — the agent's
own report, a stop, the runner dying, the sandbox going — ends it once: ``finish`` only
acts on an active run.

Commands to a run's agent (``pause``, ``resume``, ``stop``) go to the channel-layer
group ``run-<id>``, which the run's bridge connection (``viewer.consumers.agent``) joins.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from sandboxes import control, events
from sandboxes.agents.steps import StepFileError, parse_step_file
from sandboxes.backends import get_backend
from sandboxes.backends.base import BackendError, RunnerSpec
from sandboxes.models import ACTIVE_RUN_STATUSES, AgentRun, Phase, RunStatus, Sandbox, token_digest

log = logging.getLogger(__name__)

MAX_TASK = 4000
MAX_SCRIPT = 1024 * 1024
DEMO_DIR = Path(settings.BASE_DIR) / "demo"


class RunRequestError(ValueError):
    """The request for a run is invalid (a 400)."""


class RunStateError(Exception):
    """The sandbox or run is not in a state that allows this (a 409)."""


def group_name(run_id: int) -> str:
    return f"run-{run_id}"


def run_json(run: AgentRun) -> dict[str, Any]:
    return {
        "id": run.pk,
        "sandbox": run.sandbox_id,
        "task": run.task,
        "scripted": bool(run.script),
        "model": run.model_settings.get("model", ""),
        "started_by": run.started_by.get_username() if run.started_by else None,
        "status": run.status,
        "result": run.result,
        "error": run.error,
        "steps": run.steps,
        "created_at": run.created_at.isoformat(),
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "ended_at": run.ended_at.isoformat() if run.ended_at else None,
        "exit_code": run.exit_code,
    }


def demos() -> dict[str, Path]:
    """The built-in demo step files, by name (``demo/<name>.yaml``)."""
    return {path.stem: path for path in sorted(DEMO_DIR.glob("*.yaml"))}


def run_for_token(token: str, *, active: bool = True) -> AgentRun | None:
    """The run a bridge or CDP token belongs to: only an active one unless ``active`` is off."""
    if not token.startswith(AgentRun.TOKEN_PREFIX):
        return None
    runs = AgentRun.objects.filter(token_digest=token_digest(token))
    return (runs.filter(status__in=ACTIVE_RUN_STATUSES) if active else runs).first()


def bridge_url(run_id: int) -> str:
    return _ws(settings.NAMEK_INTERNAL_URL) + f"/ws/agent/{run_id}/"


def cdp_url(sandbox_id: int) -> str:
    return _ws(settings.NAMEK_INTERNAL_URL) + f"/ws/sandboxes/{sandbox_id}/cdp/"


def _ws(url: str) -> str:
    return "wss" + url[5:] if url.startswith("https") else "ws" + url[4:]


# --- starting -----------------------------------------------------------------------------


def _check_request(task: Any, script: Any, demo: Any) -> tuple[str, str]:
    if demo is not None:
        if not isinstance(demo, str) or demo not in demos():
            raise RunRequestError(f"demo: one of {', '.join(demos()) or '(none installed)'}")
        if script is not None:
            raise RunRequestError("give a script or a demo, not both")
        script = demos()[demo].read_text()
    if script is not None and not isinstance(script, str):
        raise RunRequestError("script: must be the step file's text (YAML or JSON)")
    script = script or ""
    if len(script.encode()) > MAX_SCRIPT:
        raise RunRequestError(f"script: more than {MAX_SCRIPT} bytes")
    parsed = None
    if script:
        try:
            parsed = parse_step_file(script)
        except StepFileError as exc:
            raise RunRequestError(f"script: {exc}") from None
    if task is None and parsed is not None:
        task = parsed.task or parsed.name
    if not isinstance(task, str) or not task.strip():
        raise RunRequestError("task: a non-empty string is required")
    if len(task) > MAX_TASK:
        raise RunRequestError(f"task: at most {MAX_TASK} characters")
    if not script and not settings.NAMEK_LLM_CONFIGURED:
        raise RunRequestError(
            "no LLM is configured (set NAMEK_LLM_MODEL and its endpoint): give a step file as script, or a demo"
        )
    return task.strip(), script


def start_run(sandbox: Sandbox, user: Any, task: Any = None, script: Any = None, demo: Any = None) -> AgentRun:
    """Create a run and launch its runner. Raises RunRequestError, RunStateError, BackendError."""
    task, script = _check_request(task, script, demo)
    if sandbox.phase != Phase.READY:
        raise RunStateError(f"the sandbox is {sandbox.phase}, not ready")
    model = (
        {"model": "scripted"}
        if script
        else {
            "provider": settings.NAMEK_LLM_PROVIDER,
            "model": settings.NAMEK_LLM_MODEL,
            "base_url": settings.NAMEK_LLM_BASE_URL,
        }
    )
    token, digest = AgentRun.new_token()
    try:
        with transaction.atomic():
            run = AgentRun.objects.create(
                sandbox=sandbox, task=task, script=script, started_by=user, model_settings=model, token_digest=digest
            )
            control.run_starting(sandbox.pk, run)
    except control.ControlError as exc:
        raise RunStateError(str(exc)) from None
    except IntegrityError:
        active = AgentRun.objects.filter(sandbox=sandbox, status__in=ACTIVE_RUN_STATUSES).first()
        raise RunStateError(f"the sandbox already has an active run (#{active.pk if active else '?'})") from None
    spec = RunnerSpec(run_id=run.pk, sandbox_id=sandbox.pk, token=token, bridge_url=bridge_url(run.pk))
    try:
        get_backend(sandbox.backend).start_runner(spec)
    except BackendError as exc:
        finish(run.pk, RunStatus.FAILED, error=f"could not launch the runner: {exc}")
        raise
    return run


# --- what the bridge reports --------------------------------------------------------------


def report_status(run_id: int, status: str, result: str = "", error: str = "", note: str = "") -> AgentRun | None:
    """The agent says where it is (``note``: the one its last resume carried). Returns the
    run, or None if it had already ended."""
    if status in (RunStatus.DONE, RunStatus.FAILED):
        return finish(run_id, status, result=result, error=error)
    with transaction.atomic():
        run = AgentRun.objects.select_for_update().select_related("sandbox").filter(pk=run_id).first()
        if run is None or not run.is_active or run.status == status:
            return run if run is not None and run.is_active else None
        sandbox = Sandbox.objects.select_for_update().get(pk=run.sandbox_id)
        previous, run.status = run.status, status
        if status == RunStatus.RUNNING and previous == RunStatus.PENDING:
            run.started_at = timezone.now()
            model = run.model_settings.get("model", "")
            text = f"Agent started: {run.task}"
            new = events.NewEvent("agent.started", text, {"run": run.pk, "task": run.task, "model": model})
        elif status == RunStatus.RUNNING:
            text = "Agent resumed" + (f" with the note: {note}" if note else "")
            new = events.NewEvent("agent.resumed", text, {"run": run.pk, "note": note})
        else:
            new = events.NewEvent("agent.paused", "Agent paused at a step boundary", {"run": run.pk})
        run.save(update_fields=["status", "started_at"])
        events.append(sandbox, _as_agent(new, run))
        transaction.on_commit(lambda: control.announce(sandbox.pk))  # "Paused" on the dashboard
    return run


def record_step(run_id: int, new: events.NewEvent) -> dict[str, Any] | None:
    """An ``agent.step`` or ``agent.log`` from the run's agent, stored on its sandbox."""
    with transaction.atomic():
        run = AgentRun.objects.select_for_update().filter(pk=run_id).first()
        if run is None or not run.is_active:
            return None
        if new.kind == "agent.step":
            run.steps += 1
            run.save(update_fields=["steps"])
            new.data = {**new.data, "run": run.pk, "step": run.steps}
        else:
            new.data = {**new.data, "run": run.pk}
        sandbox_id = run.sandbox_id
    stored = events.record_many(sandbox_id, [_as_agent(new, run)])
    return stored[0] if stored else None


def finish(
    run_id: int, status: str, result: str = "", error: str = "", exit_code: int | None = None
) -> AgentRun | None:
    """End an active run as done or failed, with its event. Returns it if this ended it."""
    with transaction.atomic():
        run = AgentRun.objects.select_for_update().filter(pk=run_id).first()
        if run is None:
            return None
        if exit_code is not None:
            run.exit_code = exit_code
        if not run.is_active:
            run.save(update_fields=["exit_code"])
            return None
        sandbox = Sandbox.objects.select_for_update().get(pk=run.sandbox_id)
        now = timezone.now()
        run.status, run.ended_at = status, now
        run.result, run.error = result[:10000], error[:10000]
        run.save()
        seconds = round((now - (run.started_at or run.created_at)).total_seconds(), 1)
        if status == RunStatus.DONE:
            data = {"run": run.pk, "result": run.result, "steps": run.steps, "seconds": seconds}
            new = events.NewEvent("agent.done", f"Agent done: {run.result or 'no result given'}", data)
        else:
            data = {"run": run.pk, "error": run.error, "steps": run.steps, "seconds": seconds}
            new = events.NewEvent("agent.failed", f"Agent failed: {run.error or 'no reason given'}", data)
        events.append(sandbox, _as_agent(new, run))
        control.run_ended(sandbox.pk, run.pk)
    send_command(run_id, "ended")
    return run


def runner_exited(run_id: int, exit_code: int, description: str) -> None:
    """The runner process ended: a run it left active failed."""
    finish(
        run_id,
        RunStatus.FAILED,
        error=f"the runner ended ({description}) before reporting the end",
        exit_code=exit_code,
    )


def _as_agent(new: events.NewEvent, run: AgentRun) -> events.NewEvent:
    new.source = "agent"
    new.actor = f"run #{run.pk}" + (f" ({run.model_settings.get('model')})" if run.model_settings.get("model") else "")
    return new


# --- commands -----------------------------------------------------------------------------


def send_command(run_id: int, command: str, note: str = "") -> None:
    """Send ``pause``, ``resume`` (with a note), ``stop`` or ``ended`` to the run's bridge."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group_name(run_id), {"type": "run.command", "command": command, "note": note})
    except Exception:  # the run's state is stored; a lost command shows as no ack
        log.exception("sending %s to run %s failed", command, run_id)


def _active(run: AgentRun) -> None:
    run.refresh_from_db()
    if not run.is_active:
        raise RunStateError(f"the run is {run.status}")


def pause(run: AgentRun) -> None:
    _active(run)
    send_command(run.pk, "pause")


def resume(run: AgentRun, user: Any, note: str = "") -> None:
    """Resume a paused run: it drives again (refused while a person drives)."""
    _active(run)
    if not isinstance(note, str) or len(note) > MAX_TASK:
        raise RunRequestError(f"note: a string of at most {MAX_TASK} characters")
    try:
        control.resume_agent(run.sandbox_id, user, run.pk, note)
    except control.ControlError as exc:
        raise RunStateError(str(exc)) from None
    send_command(run.pk, "resume", note)


def status_of(run_id: int) -> str | None:
    return AgentRun.objects.filter(pk=run_id).values_list("status", flat=True).first()


def stop(run: AgentRun, who: str) -> AgentRun:
    """Ask the agent to stop, make sure its runner ends, and end the run."""
    _active(run)
    send_command(run.pk, "stop")
    try:
        get_backend(run.sandbox.backend).stop_runner(run.pk, settings.NAMEK_RUN_STOP_GRACE)
    except BackendError as exc:
        log.warning("stopping the runner of run %s: %s", run.pk, exc)
    finish(run.pk, RunStatus.FAILED, error=f"stopped by {who}")
    run.refresh_from_db()
    return run


def end_runs_of(sandbox_id: int, reason: str) -> None:
    """The sandbox is going: its active runs fail (their runners are stopped with it)."""
    for run_id in AgentRun.objects.filter(sandbox_id=sandbox_id, status__in=ACTIVE_RUN_STATUSES).values_list(
        "pk", flat=True
    ):
        send_command(run_id, "stop")
        finish(run_id, RunStatus.FAILED, error=reason)
