"""The control lease and roles, through the API and the service (no sandbox processes:
the live side is in test_control_live.py and test_e2e_control.py).

Bad input tried: a take-over with a body, by a viewer, on a sandbox that is not ready,
while someone else drives, twice by the holder; a hand-back by someone who does not
hold control, when nobody does, with a note that is not a string or too long, with
unknown fields; starting an agent while a person drives; resuming an agent while a
person drives.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.test import Client
from django.utils import timezone

from sandboxes import access, control, runs
from sandboxes.models import AgentRun, ControlLease, ControlSpan, Event, Holder, RunStatus

pytestmark = pytest.mark.django_db


def bearer(cast: dict, who: str = "owner") -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {cast['tokens'][who]}"}


def post(client: Client, path: str, cast: dict, who: str = "owner", body: Any = None) -> Any:
    data = "" if body is None else json.dumps(body)
    return client.post(path, data=data, content_type="application/json", **bearer(cast, who))


def kinds(box: Any) -> list[tuple[str, str, str]]:
    return [(e.kind, e.actor, e.text) for e in Event.objects.filter(sandbox=box, kind__startswith="control.")]


def user(cast: dict, who: str) -> Any:
    from django.contrib.auth import get_user_model

    return get_user_model().objects.get(pk=cast["ids"][who])


# --- roles --------------------------------------------------------------------------------


def test_roles_decide_who_sees_and_who_uses(cast: dict, make_sandbox) -> None:
    mine, theirs = make_sandbox("owner"), make_sandbox("outsider")
    rights = {
        who: (
            [access.can_view(user(cast, who), box) for box in (mine, theirs)],
            [access.can_use(user(cast, who), box) for box in (mine, theirs)],
            access.can_create(user(cast, who)),
        )
        for who in ("owner", "operator", "viewer", "staff")
    }
    assert rights == {
        "owner": ([True, False], [True, False], True),
        "operator": ([True, True], [True, True], True),
        "viewer": ([True, True], [False, False], False),
        "staff": ([True, True], [True, True], True),
    }


def test_the_api_applies_the_roles(client: Client, cast: dict, make_sandbox) -> None:
    make_sandbox("owner")
    make_sandbox("outsider")
    listed = {who: len(client.get("/api/sandboxes", **bearer(cast, who)).json()["sandboxes"]) for who in cast["ids"]}
    assert listed == {"owner": 1, "outsider": 1, "staff": 2, "operator": 2, "viewer": 2}
    refused = post(client, "/api/sandboxes", cast, "viewer", {"name": "mine"})
    assert refused.status_code == 403 and "viewers may not create" in refused.json()["error"]
    box = make_sandbox("owner")
    assert client.delete(f"/api/sandboxes/{box.pk}", **bearer(cast, "viewer")).status_code == 403
    note = post(client, f"/api/sandboxes/{box.pk}/events", cast, "viewer", {"text": "hi"})
    assert note.status_code == 403
    assert post(client, f"/api/sandboxes/{box.pk}/events", cast, "operator", {"text": "hi"}).status_code == 201


# --- take over and hand back ----------------------------------------------------------------


def test_take_over_and_hand_back_without_an_agent(client: Client, cast: dict, make_sandbox) -> None:
    box = make_sandbox("owner")
    assert client.get(f"/api/sandboxes/{box.pk}", **bearer(cast)).json()["control"]["state"] == "nobody"
    taken = post(client, f"/api/sandboxes/{box.pk}/takeover", cast)
    assert taken.status_code == 200, taken.json()
    assert taken.json()["state"] == "you" and taken.json()["label"] == "You are driving"
    assert taken.json()["may"] == {"take_over": False, "hand_back": True, "resume": False}
    seen_by_operator = client.get(f"/api/sandboxes/{box.pk}/control", **bearer(cast, "operator")).json()
    assert (seen_by_operator["state"], seen_by_operator["label"]) == ("person", "owner is driving")
    assert seen_by_operator["may"] == {"take_over": False, "hand_back": False, "resume": False}
    again = post(client, f"/api/sandboxes/{box.pk}/takeover", cast)
    assert again.status_code == 200 and again.json()["version"] == taken.json()["version"], "taking over twice"

    back = post(client, f"/api/sandboxes/{box.pk}/handback", cast, body={"note": "done here"})
    assert back.status_code == 200 and back.json()["state"] == "nobody"
    logged = kinds(box)
    assert [k for k, _a, _t in logged] == ["control.requested", "control.granted", "control.handed_back"]
    assert logged[1][2] == "owner took over"
    assert logged[2][2].startswith("owner handed back after ") and logged[2][2].endswith("with the note: done here")
    handed = Event.objects.get(sandbox=box, kind="control.handed_back")
    assert handed.data["inputs"] == {"keys": 0, "pointer": 0, "clipboard": 0, "terminal": 0}
    assert handed.data["how"] == "handed_back" and handed.data["note"] == "done here"
    span = ControlSpan.objects.get(sandbox=box)
    assert (span.username, span.ended, span.note, span.agent_confirmed) == ("owner", "handed_back", "done here", None)


def test_refusals_are_clear_and_logged(client: Client, cast: dict, make_sandbox) -> None:
    box = make_sandbox("owner")
    viewer = post(client, f"/api/sandboxes/{box.pk}/takeover", cast, "viewer")
    assert viewer.status_code == 403 and "may not take over" in viewer.json()["error"]
    assert post(client, f"/api/sandboxes/{box.pk}/takeover", cast, "outsider").status_code == 403  # cannot see it
    with_body = post(client, f"/api/sandboxes/{box.pk}/takeover", cast, body={"force": True})
    assert with_body.status_code == 400 and "force" in with_body.json()["error"]
    assert post(client, f"/api/sandboxes/{box.pk}/takeover", cast, "operator").status_code == 200
    lost = post(client, f"/api/sandboxes/{box.pk}/takeover", cast)
    assert lost.status_code == 409 and lost.json()["error"] == "operator is driving"
    starting = make_sandbox("owner", phase="starting")
    not_ready = post(client, f"/api/sandboxes/{starting.pk}/takeover", cast)
    assert not_ready.status_code == 409 and "starting" in not_ready.json()["error"]
    refusals = list(Event.objects.filter(sandbox=box, kind="control.refused").values_list("actor", "data"))
    assert refusals == [
        ("viewer", {"reason": "viewer may not take over this sandbox (viewers only watch)"}),
        ("owner", {"reason": "operator is driving"}),
    ]


def test_only_the_holder_hands_back_and_an_admin_releases(client: Client, cast: dict, make_sandbox) -> None:
    box = make_sandbox("owner")
    nobody = post(client, f"/api/sandboxes/{box.pk}/handback", cast)
    assert nobody.status_code == 409 and nobody.json()["error"] == "nobody holds control"
    assert post(client, f"/api/sandboxes/{box.pk}/takeover", cast).status_code == 200
    for body, message in [
        ({"note": 7}, "note: must be a string"),
        ({"note": "x" * 4001}, "at most 4000"),
        ({"note": "", "why": 1}, "unknown fields: why"),
    ]:
        bad = post(client, f"/api/sandboxes/{box.pk}/handback", cast, body=body)
        assert bad.status_code == 400 and message in bad.json()["error"], bad.json()
    operator = post(client, f"/api/sandboxes/{box.pk}/handback", cast, "operator")
    assert operator.status_code == 403 and "only they or an admin" in operator.json()["error"]
    released = post(client, f"/api/sandboxes/{box.pk}/handback", cast, "staff")
    assert released.status_code == 200 and released.json()["state"] == "nobody"
    event = Event.objects.get(sandbox=box, kind="control.handed_back")
    assert event.text.startswith("staff released owner's control") and event.data["how"] == "released"


def test_an_agent_cannot_start_while_a_person_drives(client: Client, cast: dict, make_sandbox) -> None:
    box = make_sandbox("owner")
    assert post(client, f"/api/sandboxes/{box.pk}/takeover", cast).status_code == 200
    script = "steps:\n  - navigate: /demo/\n"
    refused = post(client, f"/api/sandboxes/{box.pk}/runs", cast, body={"script": script, "task": "t"})
    assert refused.status_code == 409 and "owner is driving: hand back" in refused.json()["error"]
    assert not AgentRun.objects.exists()


def agent_run(box: Any, cast: dict, status: str = RunStatus.RUNNING) -> AgentRun:
    """A run row as if its runner were up (no runner here), driving its sandbox."""
    _token, digest = AgentRun.new_token()
    run = AgentRun.objects.create(
        sandbox=box, task="t", script="steps: []", started_by=user(cast, "owner"), token_digest=digest, status=status
    )
    lease = control.lease_of(box.pk)
    lease.run, lease.holder = run, Holder.AGENT
    lease.save()
    return run


def test_an_agent_that_does_not_confirm_its_pause_is_logged_and_resumed_on_hand_back(
    client: Client, cast: dict, make_sandbox, settings: Any
) -> None:
    settings.NAMEK_TAKEOVER_PAUSE_TIMEOUT = 0.3
    box = make_sandbox("owner")
    run = agent_run(box, cast)
    assert client.get(f"/api/sandboxes/{box.pk}/control", **bearer(cast)).json()["label"] == "Agent driving"
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(runs.group_name(run.pk), channel)

    taken = post(client, f"/api/sandboxes/{box.pk}/takeover", cast, "operator")
    assert taken.status_code == 200 and taken.json()["state"] == "you"
    assert async_to_sync(layer.receive)(channel)["command"] == "pause"
    granted = Event.objects.get(sandbox=box, kind="control.granted")
    assert "the agent did not confirm its pause within" in granted.text
    assert granted.data["agent"] == "unconfirmed" and granted.data["run"] == run.pk

    back = post(client, f"/api/sandboxes/{box.pk}/handback", cast, "operator", {"note": "use the blue one"})
    assert back.status_code == 200 and back.json()["state"] == "agent"
    resume = async_to_sync(layer.receive)(channel)
    assert (resume["command"], resume["note"]) == ("resume", "use the blue one")


def test_a_paused_agent_is_granted_at_once(client: Client, cast: dict, make_sandbox) -> None:
    box = make_sandbox("owner")
    agent_run(box, cast, RunStatus.PAUSED)
    assert client.get(f"/api/sandboxes/{box.pk}/control", **bearer(cast)).json()["label"] == "Paused"
    assert post(client, f"/api/sandboxes/{box.pk}/takeover", cast).status_code == 200
    assert Event.objects.get(sandbox=box, kind="control.granted").data["agent"] == "paused"


def test_control_lapses_when_the_holder_is_gone_and_the_agent_stays_paused(
    client: Client, cast: dict, make_sandbox, settings: Any
) -> None:
    settings.NAMEK_CONTROL_LAPSE = 30
    box = make_sandbox("owner")
    run = agent_run(box, cast, RunStatus.PAUSED)
    assert post(client, f"/api/sandboxes/{box.pk}/takeover", cast, "operator").status_code == 200
    assert control.expire_lapsed() == 0, "seen just now"
    ControlLease.objects.filter(sandbox=box).update(seen_at=timezone.now() - timedelta(seconds=31))
    state = client.get(f"/api/sandboxes/{box.pk}/control", **bearer(cast)).json()  # the read applies the lapse
    assert (state["state"], state["label"]) == ("paused", "Paused")
    assert state["may"] == {"take_over": True, "hand_back": False, "resume": True}
    lapsed = Event.objects.get(sandbox=box, kind="control.lapsed")
    assert lapsed.source == "system" and lapsed.data["user"] == "operator"
    assert "no connection for 30 s; the agent stays paused" in lapsed.text
    run.refresh_from_db()
    assert run.status == RunStatus.PAUSED

    resumed = post(client, f"/api/runs/{run.pk}/resume", cast, body={"note": "carry on"})
    assert resumed.status_code == 200
    assert control.lease_of(box.pk).holder == Holder.AGENT, "the run drives again (once its runner resumes)"


def test_resuming_an_agent_is_refused_while_a_person_drives(client: Client, cast: dict, make_sandbox) -> None:
    box = make_sandbox("owner")
    run = agent_run(box, cast, RunStatus.PAUSED)
    assert post(client, f"/api/sandboxes/{box.pk}/takeover", cast, "operator").status_code == 200
    refused = post(client, f"/api/runs/{run.pk}/resume", cast, body={"note": "go"})
    assert refused.status_code == 409 and "operator is driving" in refused.json()["error"]


def test_a_stopping_sandbox_ends_a_persons_control(client: Client, cast: dict, make_sandbox) -> None:
    from sandboxes import services
    from sandboxes.models import Phase

    box = make_sandbox("owner")
    assert post(client, f"/api/sandboxes/{box.pk}/takeover", cast).status_code == 200
    services.record_phase(box.pk, Phase.STOPPING, by="owner")
    assert control.lease_of(box.pk).holder == Holder.NOBODY
    ended = Event.objects.get(sandbox=box, kind="control.handed_back")
    assert ended.data["how"] == "released" and ended.text.startswith("owner's control ended")


def test_only_a_granted_lease_makes_its_holder_drive() -> None:
    lease = {"holder": "person", "user_id": 3, "granted": False}
    assert not control.holds(lease, 3)
    assert control.holds({**lease, "granted": True}, 3)
    assert not control.holds({**lease, "granted": True}, 4)
    assert not control.holds({**lease, "holder": "agent", "granted": True}, 3)
    assert not control.holds(None, 3)


def test_the_screenshot_of_a_screen_that_does_not_answer_is_none(make_sandbox) -> None:
    box = make_sandbox("owner")  # no supervisor runs here
    assert asyncio.run(control.screenshot(box.pk)) is None


def test_namek_role_sets_and_clears_a_role(cast: dict, make_sandbox) -> None:
    from django.core.management import CommandError, call_command

    theirs = make_sandbox("staff")
    call_command("namek_role", "outsider", "viewer")
    assert access.can_view(user(cast, "outsider"), theirs) and not access.can_use(user(cast, "outsider"), theirs)
    call_command("namek_role", "outsider", "operator")
    assert access.can_use(user(cast, "outsider"), theirs)
    call_command("namek_role", "outsider", "none")
    assert not access.can_view(user(cast, "outsider"), theirs)
    with pytest.raises(CommandError, match="no user named 'nobody'"):
        call_command("namek_role", "nobody", "viewer")
    with pytest.raises(CommandError, match="invalid choice"):
        call_command("namek_role", "outsider", "king")


@pytest.mark.django_db(transaction=True)
async def test_input_about_to_be_dropped_rereads_a_grant_its_message_has_not_brought(cast: dict, make_sandbox) -> None:
    """The take-over answers once the grant is committed; a connection in another process
    may not have its message yet. Its next input reads the lease before dropping."""
    from channels.db import database_sync_to_async

    from viewer.consumers.control import ControlFollower

    box = await database_sync_to_async(make_sandbox)("owner")
    owner = await database_sync_to_async(user)(cast, "owner")
    follower = ControlFollower()
    follower.scope = {"user": owner}  # type: ignore[attr-defined]
    follower.sandbox = box  # type: ignore[attr-defined]
    follower.lease = await database_sync_to_async(lambda: control.wire(control.lease_of(box.pk)))()
    assert not follower.drives
    granted = await database_sync_to_async(control.request)(box.pk, owner)
    await database_sync_to_async(control.grant)(granted.span_id, None, 0.0, None)
    await follower.recheck_lease()
    assert follower.drives
    follower._beat.cancel()  # type: ignore[union-attr]
