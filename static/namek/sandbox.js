// The sandbox page: the live screen, and the sandbox's phase kept live.
import { api, describeClose, followSandboxes } from "./common.js";
import { showScreen } from "./screen.js";
import { mountTerminal } from "./terminal.js";

const sandbox = JSON.parse(document.getElementById("sandbox-data").textContent);
const phaseBadge = document.getElementById("phase");
const statusLine = document.getElementById("screen-status");
const container = document.getElementById("screen");
const terminalBox = document.getElementById("terminal");
const deleteButton = document.getElementById("delete-button");
const restartButton = document.getElementById("restart-button");
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
    terminal = mountTerminal(terminalBox, s.id, { onState: (text) => { terminalBox.title = text; } });
  } else if (s.phase !== "ready" && screen) {
    screen.stop();
    terminal.stop();
    screen = null;
    terminal = null;
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

applyPhase(sandbox);

followSandboxes({
  onSnapshot: (list) => {
    const found = list.find((s) => s.id === sandbox.id);
    if (found) applyPhase(found);
  },
  onChange: (s) => { if (s.id === sandbox.id) applyPhase(s); },
  onFinal: (code, reason) => setStatus(`Live updates stopped: ${describeClose(code, reason)}`, "final"),
});
