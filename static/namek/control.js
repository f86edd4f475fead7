// The control banner of the sandbox page: who drives the sandbox (its agent run, one
// person, or nobody) and the buttons this user may press about it — Take over, Hand back
// (an admin's "Release" of someone else's control), Resume agent — from
// GET /api/sandboxes/<id>/control (see sandboxes/control.py).
//
// The state is re-read whenever the event log brings a control.* or agent.* event (or
// the dashboard feed says the sandbox's control changed), so every viewer's banner
// follows live. Answers are applied in `version` order: a slow, older answer never
// overwrites a newer one. Everything shown goes in with textContent.
import { api } from "./common.js";

// agent.* events that do not change who drives: no need to ask again.
const QUIET_EVENTS = new Set(["agent.step", "agent.log"]);

export function mountControl(bar, sandboxId, initial, { username = "", onChange = () => {} } = {}) {
  const banner = bar.querySelector("#control-banner");
  const errorLine = bar.querySelector("#control-error");
  const takeoverButton = bar.querySelector("#takeover-button");
  const handbackNote = bar.querySelector("input[name=handback-note]");
  const handbackButton = bar.querySelector("#handback-button");
  const resumeNote = bar.querySelector("input[name=resume-note]");
  const resumeButton = bar.querySelector("#resume-agent-button");

  let state = initial;
  let takingOver = false; // our own take-over request is in flight
  let busy = false; // a hand back or resume is in flight
  let fetching = false;
  let again = false;

  const mine = () => Boolean(username) && state.user === username;

  function showError(text) {
    errorLine.textContent = text || "";
    errorLine.hidden = !text;
  }

  function labelFor() {
    if (takingOver) return "Taking over… waiting for the agent to pause";
    if (state.state === "pending" && mine()) return "You are taking over… waiting for the agent to pause";
    return state.label;
  }

  function render() {
    const shown = takingOver ? "pending" : state.state;
    bar.dataset.state = shown;
    banner.dataset.state = shown;
    banner.textContent = labelFor();
    banner.title = state.since ? `Since ${new Date(state.since).toLocaleString()}` : "";

    const may = state.may || {};
    takeoverButton.hidden = !(may.take_over || takingOver);
    takeoverButton.disabled = takingOver || busy;
    takeoverButton.title = state.run
      ? "Drive the sandbox yourself: the agent pauses after its current step"
      : "Drive the sandbox yourself";

    const releasing = may.hand_back && !mine(); // an admin ending someone else's control
    handbackButton.hidden = !may.hand_back || takingOver;
    handbackNote.hidden = handbackButton.hidden;
    handbackButton.disabled = busy;
    handbackButton.textContent = releasing ? "Release" : "Hand back";
    handbackButton.title = releasing
      ? `End ${state.user || "their"}'s control${state.run ? "; the agent resumes" : ""}`
      : state.run ? "Give control back to the agent, with your note" : "Stop driving";
    handbackNote.placeholder = state.run ? "Note for the agent (optional)" : "Note for the log (optional)";
    handbackNote.setAttribute("aria-label", releasing ? "Release note" : "Hand back note");

    resumeButton.hidden = !may.resume || takingOver;
    resumeNote.hidden = resumeButton.hidden;
    resumeButton.disabled = busy;
  }

  // Apply an answer of the control API unless a newer one is already shown.
  function apply(next) {
    if (!next || typeof next.version !== "number") return;
    if (typeof state.version === "number" && next.version < state.version) return;
    const before = state;
    state = next;
    render();
    onChange(state, before);
  }

  async function refresh() {
    if (fetching) {
      again = true;
      return;
    }
    fetching = true;
    try {
      do {
        again = false;
        apply(await api("GET", `/api/sandboxes/${sandboxId}/control`));
      } while (again);
    } catch (error) {
      showError(`Could not read who drives: ${error.message}`);
    } finally {
      fetching = false;
    }
  }

  takeoverButton.addEventListener("click", async () => {
    if (takingOver) return;
    takingOver = true;
    showError("");
    render();
    try {
      const next = await api("POST", `/api/sandboxes/${sandboxId}/takeover`);
      takingOver = false;
      apply(next);
    } catch (error) {
      takingOver = false;
      showError(`Could not take over: ${error.message}`);
      refresh();
    } finally {
      render();
    }
  });

  async function handBack() {
    if (busy) return;
    busy = true;
    showError("");
    render();
    const releasing = !mine();
    try {
      apply(await api("POST", `/api/sandboxes/${sandboxId}/handback`, { note: handbackNote.value }));
      handbackNote.value = "";
    } catch (error) {
      showError(`Could not ${releasing ? "release" : "hand back"}: ${error.message}`);
      refresh();
    } finally {
      busy = false;
      render();
    }
  }

  async function resumeAgent() {
    if (busy || !state.run) return;
    busy = true;
    showError("");
    render();
    try {
      await api("POST", `/api/runs/${state.run.id}/resume`, { note: resumeNote.value });
      resumeNote.value = "";
    } catch (error) {
      showError(`Could not resume the agent: ${error.message}`);
    } finally {
      busy = false;
      render();
      refresh();
    }
  }

  handbackButton.addEventListener("click", handBack);
  resumeButton.addEventListener("click", resumeAgent);
  for (const [input, action] of [[handbackNote, handBack], [resumeNote, resumeAgent]]) {
    input.addEventListener("keydown", (event) => {
      if (event.key !== "Enter") return;
      event.preventDefault();
      action();
    });
  }

  showError("");
  render();
  onChange(state, null);

  return {
    get state() { return state; },
    get driving() { return state.state === "you"; },
    refresh,
    // Called with every event of the log, old and new, in order.
    onEvent(event) {
      const kind = event.kind || "";
      if (kind.startsWith("control.") || (kind.startsWith("agent.") && !QUIET_EVENTS.has(kind))) refresh();
    },
  };
}
