// Read-only share links (sandboxes/sharing.py), two sides of the sandbox page:
//
// - mountShareDialog: the "Share" button of those who may use the sandbox opens a dialog
//   to create a link (1 h, 24 h or 7 days), copy its URL, and list and revoke the
//   sandbox's active links (POST, GET and DELETE /api/share-links).
// - followSharedView: the page opened through a link (?share=<token>) has no API and no
//   dashboard feed (both refuse share links), so who drives, the agent's state and the
//   sandbox's phase follow its event log alone. Its websockets carry the token
//   (common.js's wsUrl); the server refuses whatever input they send.
//
// Everything shown goes in with textContent.
import { api } from "./common.js";

const QUIET_AGENT_EVENTS = new Set(["agent.step", "agent.log"]);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function untilText(at) {
  const seconds = Math.round((Date.parse(at) - Date.now()) / 1000);
  if (seconds < 60) return "in under a minute";
  if (seconds < 3600) return `in ${Math.round(seconds / 60)} min`;
  if (seconds < 2 * 86400) return `in ${Math.round(seconds / 3600)} h`;
  return `in ${Math.round(seconds / 86400)} days`;
}

export function mountShareDialog(button, dialog, sandboxId) {
  const expiry = dialog.querySelector("select[name=expires_in]");
  const createButton = dialog.querySelector("#share-create-button");
  const fresh = dialog.querySelector(".share-new");
  const urlField = dialog.querySelector("#share-url");
  const copyButton = dialog.querySelector("#share-copy-button");
  const status = dialog.querySelector("#share-status");
  const list = dialog.querySelector("#share-list");

  function say(text, kind) {
    status.textContent = text || "";
    status.dataset.kind = kind || "";
  }

  async function copy(text) {
    try {
      await navigator.clipboard.writeText(text);
      say("Copied: anyone with this link can watch, read-only.", "ok");
    } catch {
      // No clipboard API (a page over plain HTTP on another host): select it for Ctrl+C.
      urlField.value = text;
      fresh.hidden = false;
      urlField.select();
      say("Press Ctrl+C to copy the selected link.");
    }
  }

  function row(link) {
    const item = element("li", "share-link");
    item.dataset.id = String(link.id);
    const when = new Date(link.expires_at);
    const uses = link.uses === 1 ? "opened once" : `opened ${link.uses} times`;
    const text = element("span", "share-link-text", `#${link.id} · expires ${untilText(link.expires_at)} · ${uses} · by ${link.created_by}`);
    text.title = `Expires ${when.toLocaleString()}`;
    const copyLink = element("button", "", "Copy");
    copyLink.type = "button";
    copyLink.addEventListener("click", () => copy(link.url));
    const revoke = element("button", "danger", "Revoke");
    revoke.type = "button";
    revoke.addEventListener("click", async () => {
      revoke.disabled = true;
      try {
        await api("DELETE", `/api/share-links/${link.id}`);
        if (urlField.value === link.url) fresh.hidden = true;
        say(`Link #${link.id} revoked: whoever has it is cut off.`, "ok");
      } catch (error) {
        say(`Could not revoke link #${link.id}: ${error.message}`, "final");
      }
      refresh();
    });
    item.append(text, copyLink, revoke);
    return item;
  }

  async function refresh() {
    try {
      const answer = await api("GET", `/api/share-links?sandbox=${sandboxId}`);
      const links = answer.share_links;
      list.replaceChildren(...links.map(row));
      if (!links.length) list.append(element("li", "share-none", "No active links."));
    } catch (error) {
      say(`Could not list the links: ${error.message}`, "final");
    }
  }

  createButton.addEventListener("click", async () => {
    createButton.disabled = true;
    say("");
    try {
      const link = await api("POST", "/api/share-links", { sandbox: sandboxId, expires_in: Number(expiry.value) });
      urlField.value = link.url;
      fresh.hidden = false;
      urlField.focus();
      urlField.select();
      say(`Link #${link.id} created; it expires ${new Date(link.expires_at).toLocaleString()}.`, "ok");
      refresh();
    } catch (error) {
      say(`Could not create a link: ${error.message}`, "final");
    } finally {
      createButton.disabled = false;
    }
  });
  copyButton.addEventListener("click", () => copy(urlField.value));
  urlField.addEventListener("focus", () => urlField.select());
  button.addEventListener("click", () => {
    say("");
    dialog.showModal();
    refresh();
  });
  dialog.addEventListener("click", (event) => { if (event.target === dialog) dialog.close(); });
}

// The shared view's control banner, agent state and phase, from the log. `after` is the
// newest seq when the page was made: older events already shaped the server's initial
// state, so only the agent's state replays them (as agent.js does).
export function followSharedView({ bar, agentState, run, control, after, onPhase }) {
  const banner = bar.querySelector("#control-banner");
  let driver = control.state; // nobody, agent, paused, pending, person
  let current = run ? { id: run.id, status: run.status, steps: run.steps || 0, text: "" } : null;

  function showControl(state, label) {
    driver = state;
    bar.dataset.state = state;
    banner.dataset.state = state;
    banner.textContent = label;
    banner.title = "";
  }

  function showAgent() {
    if (!current) {
      agentState.textContent = "No agent is running.";
      return;
    }
    const { id, status, steps } = current;
    const texts = {
      pending: [`Run #${id}: starting the agent…`, ""],
      running: [`Run #${id}: agent driving${steps ? `, step ${steps}` : ""}`, "ok"],
      paused: [`Run #${id}: paused`, "retry"],
      done: [`Run #${id} done: ${current.text || "no result given"}`, "ok"],
      failed: [`Run #${id} failed: ${current.text || "no reason given"}`, "final"],
    };
    const [text, kind] = texts[status] || [`Run #${id}: ${status}`, ""];
    agentState.textContent = text;
    agentState.dataset.kind = kind;
  }

  const active = () => current && ["pending", "running", "paused"].includes(current.status);
  const someoneDrives = () => driver === "person" || driver === "pending";

  function followAgent(event) {
    if (!event.kind.startsWith("agent.") || typeof event.data?.run !== "number") return;
    if (!current || current.id !== event.data.run) current = { id: event.data.run, status: "pending", steps: 0, text: "" };
    if (event.kind === "agent.started" || event.kind === "agent.resumed") current.status = "running";
    if (event.kind === "agent.step") {
      current.status = "running";
      current.steps = event.data.step;
    }
    if (event.kind === "agent.paused") current.status = "paused";
    if (event.kind === "agent.done") Object.assign(current, { status: "done", text: event.data.result });
    if (event.kind === "agent.failed") Object.assign(current, { status: "failed", text: event.data.error });
    showAgent();
  }

  function followControl(event) {
    const kind = event.kind;
    if (kind === "control.requested") showControl("pending", `${event.actor || "someone"} is taking over…`);
    else if (kind === "control.granted") showControl("person", `${event.actor || "someone"} is driving`);
    else if (kind === "control.handed_back") {
      if (active()) showControl("agent", "Agent driving");
      else showControl("nobody", "Nobody is driving");
    } else if (kind === "control.lapsed") {
      if (active()) showControl("paused", "Paused");
      else showControl("nobody", "Nobody is driving");
    } else if (kind.startsWith("agent.") && !QUIET_AGENT_EVENTS.has(kind) && !someoneDrives()) {
      if (kind === "agent.paused") showControl("paused", "Paused");
      else if (kind === "agent.done" || kind === "agent.failed") showControl("nobody", "Nobody is driving");
      else showControl("agent", "Agent driving");
    }
  }

  const PHASES = { "sandbox.ready": "ready", "sandbox.stopping": "stopping", "sandbox.stopped": "stopped", "sandbox.failed": "failed" };

  showAgent();
  return {
    // Called with every event of the log, old and new, in order.
    onEvent(event) {
      followAgent(event);
      if (event.seq <= after) return;
      followControl(event);
      if (PHASES[event.kind]) onPhase(PHASES[event.kind], event.data?.reason || "");
    },
  };
}
