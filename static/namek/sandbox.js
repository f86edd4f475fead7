// The sandbox page: three live panes (screen, terminal, event log), and the sandbox's
// phase kept live. The log stays readable whatever the phase; screen and terminal only
// exist while the sandbox is ready.
import { mountAgentBar } from "./agent.js";
import { api, describeClose, followSandboxes } from "./common.js";
import { mountEventLog } from "./eventlog.js";
import { enableSplitters } from "./layout.js";
import { showScreen } from "./screen.js";
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
let screen = null;
let terminal = null;

function setStatus(text, kind) {
  statusLine.textContent = text;
  statusLine.dataset.kind = kind || "";
}

function applyPhase(s) {
  phaseBadge.textContent = s.phase;
  phaseBadge.className = `phase phase-${s.phase}`;
  deleteButton.hidden = s.phase === "stopped";
  restartButton.hidden = s.phase !== "ready";
  if (s.phase === "ready" && !screen) {
    screen = showScreen(container, s.id, { onState: setStatus });
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

deleteButton.addEventListener("click", async () => {
  deleteButton.disabled = true;
  try {
    applyPhase(await api("DELETE", `/api/sandboxes/${sandbox.id}`));
  } catch (error) {
    setStatus(`Could not delete: ${error.message}`, "final");
    deleteButton.disabled = false;
  }
});

restartButton.addEventListener("click", async () => {
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

noteForm.addEventListener("submit", async (event) => {
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

enableSplitters(document.getElementById("workspace"));
const agentBar = mountAgentBar(
  document.getElementById("agent-form"), sandbox.id, JSON.parse(document.getElementById("run-data").textContent),
);
mountEventLog(document.getElementById("event-log"), sandbox.id, {
  after: Math.max(0, sandbox.last_event_seq - INITIAL_EVENTS),
  onState: (text) => { logStatus.textContent = text; },
  onEvent: (event) => agentBar.onEvent(event),
});
applyPhase(sandbox);

followSandboxes({
  onSnapshot: (list) => {
    const found = list.find((s) => s.id === sandbox.id);
    if (found) applyPhase(found);
  },
  onChange: (s) => { if (s.id === sandbox.id) applyPhase(s); },
  onFinal: (code, reason) => setStatus(`Live updates stopped: ${describeClose(code, reason)}`, "final"),
});
