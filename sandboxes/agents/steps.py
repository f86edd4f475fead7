"""Step files: what the scripted model plays, one browser action per step.

A step file is YAML (or JSON, which YAML reads too)::

    name: Request a quote                   # optional
    task: Request a quote for 20 desk lamps # optional: the agent's task
    steps:
      - navigate: /demo/quote               # a path (joined to the base URL) or an http(s) URL
        goal: Open the quote form           # optional on every step: goal, thought
      - type: {target: {label: "Full name"}, text: "Ada Lovelace"}
      - click: {target: {text: "Next"}}
      - click: {target: {role: button, name: "Next"}}
      - click: {target: {css: "#express"}}
      - select: {target: {label: "Product"}, option: "Desk lamp"}
      - scroll: {direction: down, pages: 1}
      - wait: {seconds: 1}
      - done: {text: "Quote requested", success: true}

Each step has exactly one action key. A target is exactly one of ``text``, ``label``,
``role`` (with an optional ``name``) or ``css``. The file may end without ``done``: the
player then finishes with one after the last step. Anything else is a ``StepFileError``
that names the step (1-based) and what is wrong.

Nothing here imports browser-use or Django: a step file is checked before anything starts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1024 * 1024
MAX_STEPS = 500
MAX_WAIT_SECONDS = 60
MAX_SCROLL_PAGES = 20

ACTIONS = ("navigate", "click", "type", "select", "scroll", "wait", "done")
TARGET_KINDS = ("text", "label", "role", "css")
STEP_NOTES = ("goal", "thought")
TOP_LEVEL_KEYS = ("name", "task", "steps")


class StepFileError(ValueError):
    """A step file that cannot be played; the message says where and why."""


@dataclass(frozen=True)
class Target:
    kind: str  # one of TARGET_KINDS
    value: str
    name: str | None = None  # only with kind "role": the accessible name

    def describe(self) -> str:
        if self.kind == "role":
            return f"role {self.value}" + (f' named "{self.name}"' if self.name is not None else "")
        return f'{self.kind} "{self.value}"'


@dataclass(frozen=True)
class Step:
    number: int  # 1-based, as people count them in the file
    action: str  # one of ACTIONS
    target: Target | None = None  # click, type, select
    url: str | None = None  # navigate
    text: str | None = None  # type, done
    option: str | None = None  # select
    down: bool = True  # scroll
    pages: float = 1.0  # scroll
    seconds: float = 0.0  # wait
    success: bool = True  # done
    goal: str | None = None
    thought: str | None = None

    def describe(self) -> str:
        """'step 3 (click text "Next")': how errors and logs name a step."""
        detail = ""
        if self.target is not None:
            detail = f" {self.target.describe()}"
        elif self.action == "navigate":
            detail = f" {self.url}"
        elif self.action == "scroll":
            detail = f" {'down' if self.down else 'up'} {self.pages:g} page(s)"
        elif self.action == "wait":
            detail = f" {self.seconds:g} s"
        return f"step {self.number} ({self.action}{detail})"

    def summary(self) -> str:
        """A goal for the event log when the file gives none."""
        target = self.target.describe() if self.target else ""
        summaries = {
            "navigate": f"Open {self.url}",
            "click": f"Click {target}",
            "type": f'Type "{self.text}" into {target}',
            "select": f'Choose "{self.option}" in {target}',
            "scroll": f"Scroll {'down' if self.down else 'up'} {self.pages:g} page(s)",
            "wait": f"Wait {self.seconds:g} s",
            "done": self.text or "Done",
        }
        return self.goal or summaries[self.action]


@dataclass(frozen=True)
class StepFile:
    steps: tuple[Step, ...]
    name: str | None = None
    task: str | None = None

    @property
    def ends_with_done(self) -> bool:
        return self.steps[-1].action == "done"

    def describe_task(self) -> str:
        return self.task or self.name or f"Play a script of {len(self.steps)} steps"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML would silently keep the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in mapping
        except TypeError as exc:  # an unhashable key, e.g. a list
            raise StepFileError(f"line {key_node.start_mark.line + 1}: a key must be a plain value") from exc
        if duplicate:
            raise StepFileError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_step_file(path: str | Path) -> StepFile:
    """Read and check a step file from disk (at most ``MAX_BYTES``)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise StepFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_BYTES:
        raise StepFileError(f"the step file is larger than {MAX_BYTES} bytes (1 MiB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StepFileError(f"the step file is not UTF-8 text (byte {exc.start})") from exc
    return parse_step_file(text)


def parse_step_file(text: str) -> StepFile:
    """Parse and check step-file text (YAML or JSON)."""
    if not isinstance(text, str):
        raise StepFileError("the step file must be text")
    if len(text.encode("utf-8")) > MAX_BYTES:
        raise StepFileError(f"the step file is larger than {MAX_BYTES} bytes (1 MiB)")
    if not text.strip():
        raise StepFileError("the step file is empty")
    document = _load_document(text)
    if not isinstance(document, dict):
        raise StepFileError(f"the step file must be a mapping with a 'steps' list, not {_type_name(document)}")
    unknown = [str(key) for key in document if key not in TOP_LEVEL_KEYS]
    if unknown:
        raise StepFileError(
            f"unknown top-level key(s) {', '.join(sorted(unknown))}; expected {', '.join(TOP_LEVEL_KEYS)}"
        )
    name = _optional_text(document, "name", "the step file")
    task = _optional_text(document, "task", "the step file")
    raw_steps = document.get("steps")
    if raw_steps is None:
        raise StepFileError("the step file has no 'steps'")
    if not isinstance(raw_steps, list):
        raise StepFileError(f"'steps' must be a list, not {_type_name(raw_steps)}")
    if not raw_steps:
        raise StepFileError("'steps' is empty: a step file needs at least one step")
    if len(raw_steps) > MAX_STEPS:
        raise StepFileError(f"too many steps: {len(raw_steps)}, at most {MAX_STEPS}")
    steps = tuple(_parse_step(number, raw) for number, raw in enumerate(raw_steps, start=1))
    for step in steps[:-1]:
        if step.action == "done":
            raise StepFileError(f"step {step.number}: 'done' must be the last step")
    return StepFile(steps=steps, name=name, task=task)


def _load_document(text: str) -> Any:
    if text.lstrip().startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass  # YAML flow style also starts with a brace: let YAML have a go and report
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise StepFileError(f"not valid YAML: {where}{exc.problem or exc}") from exc
    except yaml.YAMLError as exc:
        raise StepFileError(f"not valid YAML: {exc}") from exc


def _parse_step(number: int, raw: Any) -> Step:
    where = f"step {number}"
    if not isinstance(raw, dict):
        raise StepFileError(f"{where}: a step must be a mapping like {{click: ...}}, not {_type_name(raw)}")
    keys = [str(key) for key in raw]
    actions = [key for key in keys if key in ACTIONS]
    unknown = [key for key in keys if key not in ACTIONS and key not in STEP_NOTES]
    if unknown:
        raise StepFileError(
            f"{where}: unknown action or key {', '.join(repr(key) for key in unknown)}; "
            f"actions are {', '.join(ACTIONS)}"
        )
    if not actions:
        raise StepFileError(f"{where}: no action; give exactly one of {', '.join(ACTIONS)}")
    if len(actions) > 1:
        raise StepFileError(f"{where}: exactly one action per step, found {' and '.join(actions)}")
    action = actions[0]
    where = f"step {number} ({action})"
    common: dict[str, Any] = {
        "number": number,
        "action": action,
        "goal": _optional_text(raw, "goal", where),
        "thought": _optional_text(raw, "thought", where),
    }
    value = raw[action]
    if action == "navigate":
        return Step(url=_navigate_url(value, where), **common)
    params = _mapping(value, where, action)
    _only_keys(params, _PARAMETERS[action], where)
    for required in _REQUIRED[action]:
        if required not in params:
            raise StepFileError(f"{where}: missing '{required}'")
    return Step(**common, **_PARAMETER_PARSERS[action](params, where))


def _navigate_url(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise StepFileError(f"{where}: navigate takes a path or an http(s) URL, not {_type_name(value)}")
    url = value.strip()
    if not url:
        raise StepFileError(f"{where}: the path or URL is empty")
    if not (url.startswith("/") or url.lower().startswith(("http://", "https://"))):
        raise StepFileError(f"{where}: {url!r} is neither a path starting with / nor an http(s) URL")
    return url


def _click(params: dict[str, Any], where: str) -> dict[str, Any]:
    return {"target": _parse_target(params["target"], where)}


def _type(params: dict[str, Any], where: str) -> dict[str, Any]:
    return {
        "target": _parse_target(params["target"], where),
        "text": _text(params["text"], "text", where, allow_empty=True),
    }


def _select(params: dict[str, Any], where: str) -> dict[str, Any]:
    return {"target": _parse_target(params["target"], where), "option": _text(params["option"], "option", where)}


def _scroll(params: dict[str, Any], where: str) -> dict[str, Any]:
    direction = params.get("direction", "down")
    if direction not in ("down", "up"):
        raise StepFileError(f"{where}: direction must be 'down' or 'up', not {direction!r}")
    pages = _number(params.get("pages", 1), "pages", where)
    if pages <= 0 or pages > MAX_SCROLL_PAGES:
        raise StepFileError(f"{where}: pages must be more than 0 and at most {MAX_SCROLL_PAGES}, not {pages:g}")
    return {"down": direction == "down", "pages": pages}


def _wait(params: dict[str, Any], where: str) -> dict[str, Any]:
    seconds = _number(params["seconds"], "seconds", where)
    if seconds <= 0 or seconds > MAX_WAIT_SECONDS:
        raise StepFileError(f"{where}: seconds must be more than 0 and at most {MAX_WAIT_SECONDS}, not {seconds:g}")
    return {"seconds": seconds}


def _done(params: dict[str, Any], where: str) -> dict[str, Any]:
    success = params.get("success", True)
    if not isinstance(success, bool):
        raise StepFileError(f"{where}: success must be true or false, not {_type_name(success)}")
    return {"text": _text(params["text"], "text", where), "success": success}


_PARAMETERS: dict[str, tuple[str, ...]] = {
    "click": ("target",),
    "type": ("target", "text"),
    "select": ("target", "option"),
    "scroll": ("direction", "pages"),
    "wait": ("seconds",),
    "done": ("text", "success"),
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "click": ("target",),
    "type": ("target", "text"),
    "select": ("target", "option"),
    "scroll": (),
    "wait": ("seconds",),
    "done": ("text",),
}
_PARAMETER_PARSERS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "click": _click,
    "type": _type,
    "select": _select,
    "scroll": _scroll,
    "wait": _wait,
    "done": _done,
}


def _parse_target(raw: Any, where: str) -> Target:
    if not isinstance(raw, dict):
        raise StepFileError(
            f"{where}: target must be a mapping with one of {', '.join(TARGET_KINDS)}, not {_type_name(raw)}"
        )
    keys = [str(key) for key in raw]
    kinds = [key for key in keys if key in TARGET_KINDS]
    unknown = [key for key in keys if key not in TARGET_KINDS and key != "name"]
    if unknown:
        raise StepFileError(
            f"{where}: unknown target key(s) {', '.join(repr(key) for key in unknown)}; "
            f"a target is one of {', '.join(TARGET_KINDS)}"
        )
    if len(kinds) != 1:
        found = f"found {' and '.join(kinds)}" if kinds else "found none"
        raise StepFileError(f"{where}: a target needs exactly one of {', '.join(TARGET_KINDS)}, {found}")
    kind = kinds[0]
    if "name" in raw and kind != "role":
        raise StepFileError(f"{where}: 'name' goes only with a 'role' target")
    value = _text(raw[kind], f"target {kind}", where)
    name = _text(raw["name"], "target name", where) if "name" in raw else None
    return Target(kind=kind, value=value.strip() if kind != "text" else value, name=name)


def _mapping(value: Any, where: str, action: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StepFileError(f"{where}: {action} takes a mapping of parameters, not {_type_name(value)}")
    return {str(key): item for key, item in value.items()}


def _only_keys(params: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [key for key in params if key not in allowed]
    if unknown:
        raise StepFileError(
            f"{where}: unknown parameter(s) {', '.join(repr(key) for key in unknown)}; expected {', '.join(allowed)}"
        )


def _text(value: Any, field_name: str, where: str, *, allow_empty: bool = False) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise StepFileError(f"{where}: {field_name} must be text, not {_type_name(value)}")
    text = value if isinstance(value, str) else str(value)
    if not allow_empty and not text.strip():
        raise StepFileError(f"{where}: {field_name} is empty")
    return text


def _optional_text(mapping: dict[Any, Any], key: str, where: str) -> str | None:
    if key not in mapping or mapping[key] is None:
        return None
    value = mapping[key]
    if not isinstance(value, str):
        raise StepFileError(f"{where}: {key} must be text, not {_type_name(value)}")
    return value


def _number(value: Any, field_name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise StepFileError(f"{where}: {field_name} must be a number, not {_type_name(value)}")
    return float(value)


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    names = {dict: "a mapping", list: "a list", str: "text", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)
