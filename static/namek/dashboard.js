// The dashboard: the table of sandboxes, kept live by /ws/sandboxes/, with who drives
// each (its control summary; "You are driving" for the logged-in user's own control).
import { api, describeClose, followSandboxes } from "./common.js";

const rows = document.getElementById("sandbox-rows");
const table = rows.closest("table");
const username = table.dataset.username || "";
const mayCreate = table.dataset.mayCreate === "true";
const statusLine = document.getElementById("status");
const empty = document.getElementById("empty");
const sandboxes = new Map();

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function render() {
  const sorted = [...sandboxes.values()].sort((a, b) => b.id - a.id);
  rows.replaceChildren(...sorted.map(rowFor));
  empty.hidden = sorted.length > 0;
}

function rowFor(s) {
  const tr = document.createElement("tr");
  tr.dataset.sandboxId = s.id;
  const name = document.createElement("td");
  const link = document.createElement("a");
  link.href = s.url;
  link.textContent = s.name;
  name.append(link);
  const phase = cell(s.phase, `phase phase-${s.phase}`);
  if (s.failure_reason) phase.title = s.failure_reason;
  const actions = document.createElement("td");
  actions.className = "actions";
  if (s.phase !== "stopped") {
    const open = document.createElement("a");
    open.href = s.url;
    open.textContent = "Open";
    open.className = "button";
    actions.append(open);
    if (mayCreate) { // viewers change nothing
      const state = s.control?.state || "nobody";
      if (s.phase === "ready" && !["person", "pending"].includes(state)) {
        const take = document.createElement("button");
        take.textContent = "Take over";
        take.className = "takeover";
        take.title = state === "agent" ? "Pause the agent and drive its browser and shell" : "Drive its browser and shell";
        take.addEventListener("click", () => takeOver(s, take));
        actions.append(" ", take);
      }
      const del = document.createElement("button");
      del.textContent = "Delete";
      del.className = "danger";
      del.addEventListener("click", () => remove(s, del));
      actions.append(" ", del);
    }
  }
  const reason = s.phase === "failed" && s.failure_reason ? cell(s.failure_reason, "reason") : null;
  tr.append(cell(s.id), name, cell(s.owner), cell(s.screen), phase, controlCell(s), cell(new Date(s.created_at).toLocaleString()), actions);
  if (reason) phase.append(document.createElement("br"), reason);
  return tr;
}

function controlCell(s) {
  const control = s.control || { state: "nobody", label: "Nobody is driving" };
  const yours = Boolean(username) && control.user === username;
  let state = control.state;
  let label = control.label;
  if (yours && control.state === "person") [state, label] = ["you", "You are driving"];
  if (yours && control.state === "pending") label = "You are taking over…";
  const td = cell("", "control");
  const badge = document.createElement("span");
  badge.className = "control-badge";
  badge.dataset.state = state;
  badge.textContent = label;
  if (control.since) badge.title = `Since ${new Date(control.since).toLocaleString()}`;
  td.dataset.state = state;
  td.append(badge);
  return td;
}

function update(s) {
  if (s.phase === "stopped") sandboxes.delete(s.id);
  else sandboxes.set(s.id, s);
  render();
}

// Take over from the dashboard: once granted (the agent paused), open the sandbox's page.
async function takeOver(s, button) {
  button.disabled = true;
  statusLine.textContent = `Taking over ${s.name}… waiting for the agent to pause`;
  try {
    await api("POST", `/api/sandboxes/${s.id}/takeover`);
    location.href = s.url;
  } catch (error) {
    statusLine.textContent = `Could not take over ${s.name}: ${error.message}`;
    button.disabled = false;
  }
}

async function remove(s, button) {
  button.disabled = true;
  statusLine.textContent = `Deleting ${s.name}…`;
  try {
    update(await api("DELETE", `/api/sandboxes/${s.id}`));
    statusLine.textContent = `Deleted ${s.name}.`;
  } catch (error) {
    statusLine.textContent = `Could not delete ${s.name}: ${error.message}`;
    button.disabled = false;
  }
}

document.getElementById("create-form")?.addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const body = {};
  if (form.name.value.trim()) body.name = form.name.value.trim();
  if (form.screen.value.trim()) body.screen = form.screen.value.trim();
  const button = document.getElementById("create-button");
  button.disabled = true;
  statusLine.textContent = "Creating…";
  try {
    const s = await api("POST", "/api/sandboxes", body);
    update(s);
    statusLine.textContent = `Created ${s.name}; it is starting.`;
    form.reset();
  } catch (error) {
    statusLine.textContent = `Could not create the sandbox: ${error.message}`;
  } finally {
    button.disabled = false;
  }
});

// "Run demo": a new sandbox, and once it is ready an agent playing a demo step file on
// the built-in demo site; then its page, where the run shows.
const demoButton = document.getElementById("demo-button");
demoButton?.addEventListener("click", async () => {
  demoButton.disabled = true;
  statusLine.textContent = "Starting a demo sandbox…";
  try {
    let s = await api("POST", "/api/sandboxes", { name: `demo ${demoButton.dataset.demo}` });
    update(s);
    const deadline = Date.now() + 60000;
    while (s.phase === "pending" || s.phase === "starting") {
      if (Date.now() > deadline) throw new Error("the sandbox did not become ready within a minute");
      await new Promise((resolve) => setTimeout(resolve, 500));
      s = await api("GET", `/api/sandboxes/${s.id}`);
    }
    if (s.phase !== "ready") throw new Error(`the sandbox is ${s.phase}: ${s.failure_reason}`);
    await api("POST", `/api/sandboxes/${s.id}/runs`, { demo: demoButton.dataset.demo });
    location.href = s.url;
  } catch (error) {
    statusLine.textContent = `Could not run the demo: ${error.message}`;
    demoButton.disabled = false;
  }
});

for (const s of JSON.parse(document.getElementById("initial-sandboxes").textContent)) sandboxes.set(s.id, s);
render();

followSandboxes({
  onSnapshot: (list) => {
    sandboxes.clear();
    for (const s of list) sandboxes.set(s.id, s);
    render();
  },
  onChange: update,
  onFinal: (code, reason) => { statusLine.textContent = `Live updates stopped: ${describeClose(code, reason)}`; },
});
