"""A browser-use chat model that plays a step file instead of asking an LLM.

``ScriptedModel`` implements browser-use's chat-model protocol
(``browser_use.llm.base.BaseChatModel``): every ``ainvoke`` from the agent loop is answered
with the next step of the file as browser-use actions (``navigate``, ``click``, ``input``,
``select_dropdown``, ``scroll``, ``wait``, ``done``). Everything else is browser-use's own
loop: it reads the page, executes the actions, takes the screenshots, pauses and resumes.

Targets become element indices through the agent's own browser session, never through a
second connection: text, label and role targets are matched against the session's
selector map (the same ``[index]`` elements the last ``<browser_state>`` block shows the
model) and the DOM tree browser-use captured with it; a CSS target is looked up with
``document.querySelector`` on the session's CDP connection and mapped to its selector-map
entry by backend node id. Texts are compared ignoring case, extra whitespace and a
trailing ":" or "*"; an exact match wins, else a partial one is accepted. Either way the
target must match exactly one element (nested matches count once: the innermost).

Progress follows what really ran: each answer carries a tag in its ``memory``, and the
agent's history (one item per finished step, with the action results) says which tagged
answers executed and whether they succeeded. A step interrupted by a pause, or whose
action failed, is asked again and answered again (re-resolving the target on the page as
it is now). A target not found, after two short waits, or an ambiguous target, ends the
run with ``done(success=False)`` whose text names the step; ``failure`` holds that text.

Call ``attach(agent)`` after creating the ``Agent``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from sandboxes.agents.steps import Step, StepFile, Target

if TYPE_CHECKING:
    from browser_use import Agent
    from browser_use.browser import BrowserSession
    from browser_use.dom.views import EnhancedDOMTreeNode
    from browser_use.llm.messages import BaseMessage
    from browser_use.llm.views import ChatInvokeCompletion

logger = logging.getLogger(__name__)

# Roles whose accessible name is their label, not text shown on them.
FIELD_ROLES = {
    "textbox",
    "searchbox",
    "combobox",
    "listbox",
    "spinbutton",
    "checkbox",
    "radio",
    "slider",
    "switch",
    "menuitemcheckbox",
    "menuitemradio",
}
FIELD_TAGS = {"input", "select", "textarea"}
BUTTON_INPUT_TYPES = {"button", "submit", "reset", "image"}
TEXT_INPUT_TYPES = {"", "text", "email", "password", "search", "tel", "url", "number", "date", "time"}
# browser-use's wait action sleeps (seconds - 1), at most 30 s per action.
WAIT_ACTION_MAX = 30
MISSING_TARGET_WAIT = 1  # seconds between looks for a target that is not there yet
MAX_TREE_NODES = 200_000

_TAG = re.compile(r"\[namek script step (\d+), answer (\d+)\]")
# How browser-use puts Agent.add_new_task() text (a person's hand-back note) into the prompt.
_FOLLOW_UP = re.compile(r"<follow_up_user_request>(.*?)</follow_up_user_request>", re.DOTALL)


class TargetError(Exception):
    """A target that matches no element (``retry`` may help) or several."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


class _NotYet(Exception):
    """The step's target is not on the page yet: wait a little and look again."""


class _CannotPlay(Exception):
    """The step cannot be played: the run fails with this reason."""


@dataclass
class _Answer:
    seq: int
    index: int  # position in the script (0-based); len(steps) for the closing done
    kind: str  # "step", "wait-for-target" or "final"


class ScriptedModel:
    """Plays a ``StepFile`` through a browser-use ``Agent`` (see the module docstring)."""

    _verified_api_keys = True  # browser-use skips its API-key check for verified models

    def __init__(
        self,
        script: StepFile,
        *,
        base_url: str | None = None,
        missing_target_waits: int = 2,
        max_attempts: int = 3,
    ) -> None:
        self.model = "scripted"
        self.script = script
        self.base_url = base_url
        self.missing_target_waits = missing_target_waits
        self.max_attempts = max_attempts
        self.received: list[list[BaseMessage]] = []  # every message list ainvoke was given
        self.failure: str | None = None  # why the script could not go on, once it cannot
        self.position = 0  # index of the next step to play: everything before it has run
        self._agent: Agent | None = None
        self._answers: dict[int, _Answer] = {}
        self._seq = 0
        self._seen_history = 0
        self._attempts: dict[int, int] = {}
        self._problems: dict[int, str] = {}
        self._waits: dict[int, int] = {}
        self._last_outcome = "Nothing done yet."
        self._notes_read = 0
        self._unread_notes: list[str] = []

    # -- the chat-model protocol ---------------------------------------------------------

    @property
    def provider(self) -> str:
        return "namek"

    @property
    def name(self) -> str:
        return "scripted"

    @property
    def model_name(self) -> str:
        return self.model

    def attach(self, agent: Agent) -> None:
        """The agent whose session resolves targets and whose history tracks progress."""
        self._agent = agent

    async def ainvoke(
        self, messages: list[BaseMessage], output_format: type[Any] | None = None, **kwargs: Any
    ) -> ChatInvokeCompletion[Any]:
        from browser_use.llm.views import ChatInvokeCompletion

        self.received.append(list(messages))
        if output_format is None:
            # A plain-text request (e.g. history compaction): there is nothing to summarise.
            return ChatInvokeCompletion(completion="A scripted run: the steps are in the step file.", usage=None)
        if self._agent is None:
            raise RuntimeError("ScriptedModel.attach(agent) must be called before the agent runs")
        self._sync_progress()
        self._read_notes(messages)
        answer = await self._next_answer()
        try:
            parsed = output_format.model_validate(answer)
        except ValidationError as exc:
            # The agent now allows only `done` (its last step, or too many failures).
            logger.info("browser-use refused the answer (%s errors): it allows only done now", exc.error_count())
            step = self._current_step()
            where = step.describe() if step else "the end of the script"
            answer = self._fail(
                self.position, f"{where}: the agent allows only 'done' now (its step or failure budget is used up)"
            )
            parsed = output_format.model_validate(answer)
        return ChatInvokeCompletion(completion=parsed, usage=None)

    # -- progress --------------------------------------------------------------------------

    def _current_step(self) -> Step | None:
        steps = self.script.steps
        return steps[self.position] if self.position < len(steps) else None

    def _sync_progress(self) -> None:
        """Read the agent's finished steps since the last call: which of our answers ran, how."""
        assert self._agent is not None
        history = self._agent.history.history
        for item in history[self._seen_history :]:
            output = item.model_output
            match = _TAG.search(output.memory or "") if output is not None else None
            answer = self._answers.pop(int(match.group(2)), None) if match else None
            if answer is None or answer.kind != "step":
                continue
            step = self.script.steps[answer.index]
            problem = _problem(output.action if output else [], item.result)
            if problem is None:
                self.position = max(self.position, answer.index + 1)
                self._last_outcome = f"{step.describe()} done."
            else:
                self._attempts[answer.index] = self._attempts.get(answer.index, 0) + 1
                self._problems[answer.index] = problem
                self._last_outcome = f"{step.describe()} failed: {problem}"
                logger.info("%s did not work (attempt %s): %s", step.describe(), self._attempts[answer.index], problem)
        self._seen_history = len(history)

    def _read_notes(self, messages: list[BaseMessage]) -> None:
        """Notes added with add_new_task() since the last call: the next answer mentions them."""
        notes: list[str] = []
        for message in messages:
            notes = [note.strip() for note in _FOLLOW_UP.findall(message.text)] or notes
        if len(notes) > self._notes_read:
            self._unread_notes.extend(notes[self._notes_read :])
            self._notes_read = len(notes)

    # -- answers -----------------------------------------------------------------------------

    async def _next_answer(self) -> dict[str, Any]:
        steps = self.script.steps
        index = self.position
        if self.failure is not None:
            return self._answer(index, "final", "Stop: the script cannot go on", [_done(self.failure, False)])
        if index >= len(steps):
            text = f"Played all {len(steps)} steps" + (f" of {self.script.name}" if self.script.name else "")
            return self._answer(index, "final", "Finish the script", [_done(text, True)])
        step = steps[index]
        if self._attempts.get(index, 0) >= self.max_attempts:
            return self._fail(index, f"{step.describe()}: failed {self.max_attempts} times: {self._problems[index]}")
        try:
            actions = await self._actions_for(index, step)
        except _NotYet as exc:
            return self._answer(index, "wait-for-target", str(exc), [_wait(MISSING_TARGET_WAIT)], step)
        except _CannotPlay as exc:
            return self._fail(index, f"{step.describe()}: {exc}")
        if step.action == "done" and not step.success:
            self.failure = step.text
        return self._answer(index, "step", step.summary(), actions, step)

    async def _actions_for(self, index: int, step: Step) -> list[dict[str, Any]]:
        """browser-use actions for one step: element indices resolved on the page as it is now."""
        if step.action == "navigate":
            assert step.url is not None
            url = step.url
            if url.startswith("/"):
                if not self.base_url:
                    raise _CannotPlay("a path needs a base URL, and none was given")
                url = urllib.parse.urljoin(self.base_url, url)
            return [{"navigate": {"url": url, "new_tab": False}}]
        if step.target is not None:
            element = await self._element(index, step.target)
            name, extra = {
                "click": ("click", {}),
                "type": ("input", {"text": step.text, "clear": True}),
                "select": ("select_dropdown", {"text": step.option}),
            }[step.action]
            return [{name: {"index": element, **extra}}]
        if step.action == "scroll":
            return [{"scroll": {"down": step.down, "pages": step.pages}}]
        if step.action == "wait":
            total = math.ceil(step.seconds)
            return [_wait(min(WAIT_ACTION_MAX, total - start)) for start in range(0, total, WAIT_ACTION_MAX)]
        assert step.text is not None
        return [_done(step.text, step.success)]

    async def _element(self, index: int, target: Target) -> int:
        try:
            return await self._resolve(target)
        except TargetError as exc:
            waits = self._waits.get(index, 0)
            if exc.retry and waits < self.missing_target_waits:
                self._waits[index] = waits + 1
                raise _NotYet(f"Wait for {target.describe()} to appear ({exc})") from exc
            raise _CannotPlay(str(exc)) from exc

    def _answer(
        self, index: int, kind: str, goal: str, actions: list[dict[str, Any]], step: Step | None = None
    ) -> dict[str, Any]:
        self._seq += 1
        self._answers[self._seq] = _Answer(seq=self._seq, index=index, kind=kind)
        number = step.number if step else index + 1
        thoughts = [f"Read the note: {note}" for note in self._unread_notes]
        self._unread_notes = []
        if step is not None and step.thought:
            thoughts.append(step.thought)
        return {
            "thinking": "\n".join(thoughts) or None,
            "evaluation_previous_goal": self._last_outcome,
            "memory": f"[namek script step {number}, answer {self._seq}] {len(self.script.steps)} steps in all",
            "next_goal": goal,
            "action": actions,
        }

    def _fail(self, index: int, message: str) -> dict[str, Any]:
        logger.info("The script stops: %s", message)
        self.failure = message
        return self._answer(index, "final", "Stop: the script cannot go on", [_done(message, False)])

    # -- targets -----------------------------------------------------------------------------

    async def _resolve(self, target: Target) -> int:
        """The selector-map index of the one element ``target`` names."""
        assert self._agent is not None
        session = self._agent.browser_session
        assert session is not None
        selector_map = await session.get_selector_map()
        if not selector_map:
            raise TargetError(f"{target.describe()} not found: the page has no interactive elements", retry=True)
        if target.kind == "css":
            return await _resolve_css(session, selector_map, target.value)
        page = _Page(selector_map)
        if target.kind == "text":
            return page.pick(target, page.texts)
        if target.kind == "label":
            return page.pick(target, lambda node: page.labels(node) if page.is_field(node) else [])
        wanted = target.value.casefold()
        return page.pick(
            target,
            lambda node: page.names(node) if page.role(node) == wanted else [],
            match_any=target.name is None,
        )


def _done(text: str, success: bool) -> dict[str, Any]:
    return {"done": {"text": text, "success": success}}


def _wait(seconds: int) -> dict[str, Any]:
    return {"wait": {"seconds": seconds + 1}}  # browser-use waits one second less than asked


def _problem(actions: list[Any], results: list[Any]) -> str | None:
    """Why the actions of a finished step did not do their job, or None when they did."""
    names = [next(iter(action.model_dump(exclude_unset=True)), "unknown") for action in actions]
    if not results or len(results) < len(names):
        return "not every action ran"
    problems = (_result_problem(name, result) for name, result in zip(names, results, strict=False))
    return next((problem for problem in problems if problem is not None), None)


def _result_problem(name: str, result: Any) -> str | None:
    # browser-use reports some failures as plain results, not errors: look at what it said.
    content = str(result.extracted_content or "")
    if result.error:
        problem: str | None = str(result.error)
    elif "not available - page may have changed" in content:
        problem = content
    elif name == "click" and result.include_extracted_content_only_once:
        # A click on a <select> answers with its options instead of clicking.
        problem = f"the element is a dropdown, use a select step: {content[:200]}"
    elif name == "select_dropdown" and not str(result.long_term_memory or "").startswith("Selected dropdown option"):
        problem = str(result.long_term_memory or content or "the option could not be selected")[:500]
    else:
        problem = None
    return problem


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _norm_label(text: str) -> str:
    return _norm(text).rstrip(" :*").strip()


class _Page:
    """Text, labels and roles of the elements in one selector map, and their DOM tree."""

    def __init__(self, selector_map: dict[int, EnhancedDOMTreeNode]) -> None:
        self.selector_map = selector_map
        self.by_id: dict[str, list[EnhancedDOMTreeNode]] = {}
        self.labels_for: dict[str, list[str]] = {}
        roots: dict[int, EnhancedDOMTreeNode] = {}
        for node in selector_map.values():
            root = node
            while root.parent_node is not None:
                root = root.parent_node
            roots[id(root)] = root
        for root in roots.values():
            for node in _walk(root):
                attributes = node.attributes or {}
                if attributes.get("id"):
                    self.by_id.setdefault(attributes["id"], []).append(node)
                if node.tag_name == "label" and attributes.get("for"):
                    self.labels_for.setdefault(attributes["for"], []).append(_text_of(node))

    def pick(
        self,
        target: Target,
        texts_of: Callable[[EnhancedDOMTreeNode], list[str]],
        *,
        match_any: bool = False,
    ) -> int:
        """The one index whose texts match ``target`` (exactly, else as a part)."""
        wanted = target.name if target.kind == "role" else target.value
        wanted_norm = _norm_label(wanted) if wanted is not None else ""
        exact: list[tuple[int, EnhancedDOMTreeNode]] = []
        partial: list[tuple[int, EnhancedDOMTreeNode]] = []
        for index, node in self.selector_map.items():
            texts = [_norm_label(text) for text in texts_of(node) if text and text.strip()]
            if target.kind == "role" and self.role(node) == target.value.casefold() and match_any:
                exact.append((index, node))
            elif wanted_norm and wanted_norm in texts:
                exact.append((index, node))
            elif wanted_norm and any(wanted_norm in text for text in texts):
                partial.append((index, node))
        for tier in (exact, partial):
            matches = _innermost(tier)
            if len(matches) == 1:
                return matches[0][0]
            if len(matches) > 1:
                shown = "; ".join(_describe(index, node) for index, node in matches[:6])
                more = f" and {len(matches) - 6} more" if len(matches) > 6 else ""
                raise TargetError(
                    f"{target.describe()} is ambiguous: {len(matches)} elements match: {shown}{more}", retry=False
                )
        raise TargetError(
            f"{target.describe()} not found among the {len(self.selector_map)} interactive elements on the page"
            " (elements far outside the viewport are not listed: scroll first)",
            retry=True,
        )

    def is_field(self, node: EnhancedDOMTreeNode) -> bool:
        attributes = node.attributes or {}
        if node.tag_name in FIELD_TAGS:
            return attributes.get("type", "").lower() != "hidden"
        editable = "contenteditable" in attributes and attributes["contenteditable"].lower() in ("", "true")
        return editable or self.role(node) in FIELD_ROLES

    def role(self, node: EnhancedDOMTreeNode) -> str:
        explicit = (node.attributes or {}).get("role", "").split()
        if explicit:
            return explicit[0].casefold()
        if node.ax_node is not None and node.ax_node.role and node.ax_node.role not in ("generic", "none"):
            return node.ax_node.role.casefold()
        return _implicit_role(node)

    def texts(self, node: EnhancedDOMTreeNode) -> list[str]:
        """What a person reads on the element: its text, a button's value, its aria-label."""
        attributes = node.attributes or {}
        texts = [_text_of(node), attributes.get("aria-label", "")]
        if node.tag_name == "input" and attributes.get("type", "").lower() in BUTTON_INPUT_TYPES:
            texts.append(attributes.get("value", ""))
        if node.tag_name in ("a", "button") or self.role(node) in ("button", "link", "tab", "menuitem", "option"):
            if node.ax_node is not None and node.ax_node.name:
                texts.append(node.ax_node.name)
        return texts

    def labels(self, node: EnhancedDOMTreeNode) -> list[str]:
        """A field's labels: <label for>, a wrapping <label>, aria-label(ledby), placeholder."""
        attributes = node.attributes or {}
        labels = [attributes.get("aria-label", ""), attributes.get("placeholder", ""), attributes.get("title", "")]
        if node.ax_node is not None and node.ax_node.name:
            labels.append(node.ax_node.name)
        if attributes.get("id"):
            labels.extend(self.labels_for.get(attributes["id"], []))
        for label_id in attributes.get("aria-labelledby", "").split():
            labels.extend(_text_of(element) for element in self.by_id.get(label_id, []))
        parent = node.parent_node
        while parent is not None:
            if parent.tag_name == "label":
                labels.append(_text_of(parent))
                break
            parent = parent.parent_node
        return labels

    def names(self, node: EnhancedDOMTreeNode) -> list[str]:
        """An element's accessible names: what a role target's ``name`` is compared with."""
        names = self.texts(node)
        if self.is_field(node):
            names.extend(self.labels(node))
        elif node.ax_node is not None and node.ax_node.name:
            names.append(node.ax_node.name)
        return names


_TAG_ROLES = {"button": "button", "textarea": "textbox"}
_INPUT_ROLES = {
    **dict.fromkeys(BUTTON_INPUT_TYPES, "button"),
    **dict.fromkeys(TEXT_INPUT_TYPES, "textbox"),
    "checkbox": "checkbox",
    "radio": "radio",
    "number": "spinbutton",
    "range": "slider",
    "search": "searchbox",
}


def _implicit_role(node: EnhancedDOMTreeNode) -> str:
    """The ARIA role HTML gives an element, for nodes browser-use has no accessibility data for."""
    attributes = node.attributes or {}
    tag = node.tag_name
    if tag == "a":
        return "link" if "href" in attributes else ""
    if tag == "select":
        return "listbox" if "multiple" in attributes else "combobox"
    if tag == "input":
        return _INPUT_ROLES.get(attributes.get("type", "").lower(), "")
    return _TAG_ROLES.get(tag, "")


def _walk(root: EnhancedDOMTreeNode) -> Iterator[EnhancedDOMTreeNode]:
    stack = [root]
    seen = 0
    while stack and seen < MAX_TREE_NODES:
        node = stack.pop()
        seen += 1
        yield node
        stack.extend(reversed(node.children_and_shadow_roots))
        if node.content_document is not None:
            stack.append(node.content_document)


def _text_of(node: EnhancedDOMTreeNode) -> str:
    return " ".join(node.get_all_children_text().split())


def _innermost(
    matches: list[tuple[int, EnhancedDOMTreeNode]],
) -> list[tuple[int, EnhancedDOMTreeNode]]:
    """Drop matches that contain another match (a clickable row around its button)."""
    if len(matches) < 2:
        return matches
    matched = {id(node) for _, node in matches}
    outer: set[int] = set()
    for _, node in matches:
        parent = node.parent_node
        while parent is not None:
            if id(parent) in matched:
                outer.add(id(parent))
            parent = parent.parent_node
    return [(index, node) for index, node in matches if id(node) not in outer]


def _describe(index: int, node: EnhancedDOMTreeNode) -> str:
    attributes = node.attributes or {}
    shown = " ".join(f'{key}="{attributes[key]}"' for key in ("id", "name", "type", "class") if attributes.get(key))
    text = _text_of(node)[:40]
    return f"[{index}] <{node.tag_name}{' ' + shown if shown else ''}>" + (f' "{text}"' if text else "")


async def _resolve_css(session: BrowserSession, selector_map: dict[int, EnhancedDOMTreeNode], selector: str) -> int:
    """Find the one element matching ``selector`` through the session's own CDP connection."""
    target = Target(kind="css", value=selector)
    cdp = await session.get_or_create_cdp_session()
    backend_node_id = await _css_backend_node_id(cdp, target)

    def in_this_page(node: EnhancedDOMTreeNode) -> bool:
        return str(node.session_id) == str(cdp.session_id) or str(node.target_id) == str(cdp.target_id)

    indices = {id(node): index for index, node in selector_map.items() if in_this_page(node)}
    for index, node in selector_map.items():
        if node.backend_node_id == backend_node_id and id(node) in indices:
            return index
    # Not interactive itself: accept its one interactive descendant, or its nearest interactive ancestor.
    roots = {id(root): root for root in (_root(node) for node in selector_map.values() if in_this_page(node))}
    element = next(
        (node for root in roots.values() for node in _walk(root) if node.backend_node_id == backend_node_id), None
    )
    if element is not None:
        inside = [indices[id(node)] for node in _walk(element) if id(node) in indices and node is not element]
        if len(inside) == 1:
            return inside[0]
        parent = element.parent_node
        while parent is not None and id(parent) not in indices:
            parent = parent.parent_node
        if parent is not None:
            return indices[id(parent)]
    raise TargetError(
        f"{target.describe()} matches an element browser-use does not list as interactive"
        " (hidden, outside the viewport or not clickable)",
        retry=True,
    )


async def _css_backend_node_id(cdp: Any, target: Target) -> int:
    """document.querySelector in the agent's tab, through browser-use's CDP session: a backend node id."""
    send = cdp.cdp_client.send
    quoted = json.dumps(target.value)
    counted = await send.Runtime.evaluate(
        params={"expression": f"document.querySelectorAll({quoted}).length", "returnByValue": True},
        session_id=cdp.session_id,
    )
    if counted.get("exceptionDetails"):
        raise TargetError(f"{target.describe()} is not a valid CSS selector", retry=False)
    count = int(counted.get("result", {}).get("value") or 0)
    if count == 0:
        raise TargetError(f"{target.describe()} matches no element on the page", retry=True)
    if count > 1:
        described = await send.Runtime.evaluate(
            params={
                "expression": (
                    f"Array.from(document.querySelectorAll({quoted})).slice(0, 6)"
                    ".map(e => e.outerHTML.replace(/\\s+/g, ' ').slice(0, 80))"
                ),
                "returnByValue": True,
            },
            session_id=cdp.session_id,
        )
        shown = "; ".join(described.get("result", {}).get("value") or [])
        raise TargetError(f"{target.describe()} is ambiguous: {count} elements match: {shown}", retry=False)
    group = "namek-scripted-model"
    try:
        found = await send.Runtime.evaluate(
            params={"expression": f"document.querySelector({quoted})", "objectGroup": group},
            session_id=cdp.session_id,
        )
        object_id = found.get("result", {}).get("objectId")
        if not object_id:
            raise TargetError(f"{target.describe()} matches no element on the page", retry=True)
        described_node = await send.DOM.describeNode(params={"objectId": object_id}, session_id=cdp.session_id)
        return int(described_node["node"]["backendNodeId"])
    finally:
        await send.Runtime.releaseObjectGroup(params={"objectGroup": group}, session_id=cdp.session_id)


def _root(node: EnhancedDOMTreeNode) -> EnhancedDOMTreeNode:
    while node.parent_node is not None:
        node = node.parent_node
    return node
