// The sandbox page: three live panes (screen, terminal, event log), and the sandbox's
// phase kept live. The log stays readable whatever the phase; screen and terminal only
// exist while the sandbox is ready.
//
// The control banner (control.js) says who drives. Only while this user drives is the
// screen interactive (noVNC's viewOnly off; it gets the keyboard focus when they take
// over) and the clipboard panel shown; the terminal follows by itself (its server
// re-sends "setup" with readonly).
//
// Opened through a read-only share link (?share=<token>, share.js), the page has none of
// the parts that act, nor the API or the dashboard feed: it follows the log alone.
import { mountAgentBar } from "./agent.js";
import { api, describeClose, followSandboxes, shareToken } from "./common.js";
import { mountControl } from "./control.js";
import { mountEventLog } from "./eventlog.js";
import { enableSplitters } from "./layout.js";
import { showScreen } from "./screen.js";
import { followSharedView, mountShareDialog } from "./share.js";
import { mountTerminal } from "./terminal.js";

// How many of the newest events the log starts with; older ones are in the API.
const INITIAL_EVENTS = 200;

const sandbox = JSON.parse(document.getElementById("sandbox-data").textContent);
const phaseBadge = document.getElementById("phase");
const statusLine = document.getElementById("screen-status");
const container = document.getElementById("screen");
const terminalBox = document.getElementById("terminal");
const deleteButton = document.getElementById("delete-button");
const restartButton = document.getElementById("restart-button");
const terminalStatus = document.getElementById("terminal-status");
const logStatus = document.getElementById("log-status");
const noteForm = document.getElementById("note-form");
const controlBar = document.getElementById("control-bar");
const workspace = document.getElementById("workspace");
const clipboardPanel = document.getElementById("clipboard-panel"); // none in the shared view
const clipboardOut = clipboardPanel?.querySelector("textarea[name=clipboard-out]");
const clipboardIn = document.getElementById("sandbox-clipboard");
const clipboardStatus = document.getElementById("clipboard-status");
const pasteButton = document.getElementById("paste-button");
const mayUse = controlBar.dataset.mayUse === "true";
const shared = Boolean(shareToken());
let screen = null;
let terminal = null;
let driving = false;
let lastControl = null; // the dashboard feed's control summary, to notice changes

function setStatus(text, kind) {
  statusLine.textContent = text;
  statusLine.dataset.kind = kind || "";
}

function applyPhase(s) {
  phaseBadge.textContent = s.phase;
  phaseBadge.className = `phase phase-${s.phase}`;
  if (deleteButton) deleteButton.hidden = s.phase === "stopped";
  if (restartButton) restartButton.hidden = s.phase !== "ready";
  if (s.phase === "ready" && !screen) {
    screen = showScreen(container, s.id, {
      onState: setStatus,
      onClipboard: (text) => { if (clipboardIn) clipboardIn.value = text; },
      viewOnly: !driving,
    });
    terminal = mountTerminal(terminalBox, s.id, { onState: (text) => { terminalStatus.textContent = text; } });
  } else if (s.phase !== "ready" && screen) {
    screen.stop();
    terminal.stop();
    screen = null;
    terminal = null;
    terminalStatus.textContent = "";
  }
  if (s.phase === "starting" || s.phase === "pending") setStatus("The sandbox is starting…", "retry");
  if (s.phase === "failed") setStatus(`The sandbox failed: ${s.failure_reason || "no reason given"}`, "final");
  if (s.phase === "stopped" || s.phase === "stopping") setStatus(`The sandbox is ${s.phase}.`, "final");
}

deleteButton?.addEventListener("click", async () => {
  deleteButton.disabled = true;
  try {
    applyPhase(await api("DELETE", `/api/sandboxes/${sandbox.id}`));
  } catch (error) {
    setStatus(`Could not delete: ${error.message}`, "final");
    deleteButton.disabled = false;
  }
});

restartButton?.addEventListener("click", async () => {
  restartButton.disabled = true;
  setStatus("Restarting the browser…", "retry");
  try {
    const s = await api("POST", `/api/sandboxes/${sandbox.id}/restart-browser`);
    setStatus(`${s.last_browser_exit} (${s.browser_restarts} restart${s.browser_restarts === 1 ? "" : "s"} so far)`, "ok");
  } catch (error) {
    setStatus(`Could not restart the browser: ${error.message}`, "final");
  } finally {
    restartButton.disabled = false;
  }
});

noteForm?.addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = noteForm.elements.text;
  if (!input.value.trim()) return;
  noteForm.elements[1].disabled = true;
  try {
    await api("POST", `/api/sandboxes/${sandbox.id}/events`, { text: input.value });
    input.value = "";
  } catch (error) {
    logStatus.textContent = `Could not add the note: ${error.message}`;
  } finally {
    noteForm.elements[1].disabled = false;
  }
});

pasteButton?.addEventListener("click", () => {
  if (!clipboardOut.value) {
    clipboardStatus.textContent = "Nothing to paste.";
    return;
  }
  if (screen && screen.pasteClipboard(clipboardOut.value)) {
    clipboardStatus.textContent = "On the sandbox's clipboard: press Ctrl+V there.";
    screen.focus();
  } else {
    clipboardStatus.textContent = "Not sent: the screen is not connected, or you do not drive.";
  }
});
clipboardIn?.addEventListener("focus", () => clipboardIn.select());

// Who drives changed (or was first read): follow it with the screen and the panels.
function applyControl(state, before) {
  const was = driving;
  driving = state.state === "you";
  workspace.dataset.control = state.state;
  clipboardPanel.hidden = !driving;
  if (!driving) clipboardStatus.textContent = "";
  if (screen) screen.setViewOnly(!driving);
  agentBar.setControl(state);
  if (driving && !was && before !== null && screen) screen.focus();
}

enableSplitters(workspace);
const initialRun = JSON.parse(document.getElementById("run-data").textContent);
const initialControl = JSON.parse(document.getElementById("control-data").textContent);
const agentBar = shared ? null : mountAgentBar(document.getElementById("agent-form"), sandbox.id, initialRun, { mayUse });
const control = shared ? null : mountControl(controlBar, sandbox.id, initialControl, {
  username: controlBar.dataset.username,
  onChange: applyControl,
});
const sharedView = shared ? followSharedView({
  bar: controlBar,
  agentState: document.getElementById("agent-state"),
  run: initialRun,
  control: initialControl,
  after: sandbox.last_event_seq,
  onPhase: (phase, reason) => applyPhase({ ...sandbox, phase, failure_reason: reason }),
}) : null;
const shareButton = document.getElementById("share-button");
if (shareButton) mountShareDialog(shareButton, document.getElementById("share-dialog"), sandbox.id);
mountEventLog(document.getElementById("event-log"), sandbox.id, {
  after: Math.max(0, sandbox.last_event_seq - INITIAL_EVENTS),
  onState: (text) => { logStatus.textContent = text; },
  onEvent: (event) => {
    agentBar?.onEvent(event);
    control?.onEvent(event);
    sharedView?.onEvent(event);
  },
});
applyPhase(sandbox);

// The dashboard feed: the phase, and a nudge when who drives changed (or the phase,
// which decides whether taking over is possible).
function followed(s) {
  const key = JSON.stringify([s.phase, s.control?.state, s.control?.user, s.control?.since]);
  if (lastControl !== null && key !== lastControl) control.refresh();
  lastControl = key;
  applyPhase(s);
}

if (!shared) followSandboxes({
  onSnapshot: (list) => {
    const found = list.find((s) => s.id === sandbox.id);
    if (found) followed(found);
  },
  onChange: (s) => { if (s.id === sandbox.id) followed(s); },
  onFinal: (code, reason) => setStatus(`Live updates stopped: ${describeClose(code, reason)}`, "final"),
});
