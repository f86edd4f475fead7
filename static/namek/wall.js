// The wall: every live sandbox as a tile with a live thumbnail and a caption (name,
// phase, who drives, the agent's goal), from /ws/wall/ (viewer/consumers/wall.py).
//
// Text frames carry the list of sandboxes; binary frames a thumbnail (4-byte big-endian
// sandbox id, then a JPEG). Each thumbnail is acknowledged ({"type": "ack", "id": id})
// once it is decoded: the server sends the next one of that sandbox only then, so a slow
// screen gets fewer frames instead of a queue.
//
// Click a tile: its live screen full size (noVNC, view-only), Escape or Close to leave.
// Kiosk (?kiosk=1): full screen, no navigation; a large live view of one sandbox at a
// time, a new one every ?rotate= seconds: each round starts with the most recently active
// sandbox and goes through the others by activity. Everything shown that a sandbox or
// an agent supplies goes in through textContent.
import { describeClose, keepConnected, wsUrl } from "./common.js";
import { showScreen } from "./screen.js";

const root = document.getElementById("wall");
const kiosk = root.dataset.kiosk === "true";
const rotateMs = Math.max(3, Number(root.dataset.rotate) || 15) * 1000;
const grid = document.getElementById("wall-grid");
const statusLine = document.getElementById("wall-status");
const empty = document.getElementById("wall-empty");
const count = document.getElementById("wall-count");
const PHASES = new Set(["pending", "starting", "ready", "stopping", "stopped", "failed"]);
const NOBODY = { state: "nobody", label: "Nobody is driving" };

const sandboxes = new Map(); // id -> the sandbox as the server sent it, in its order
const tiles = new Map(); // id -> the tile's elements, its newest image URL and frame count

function setStatus(text, kind) {
  statusLine.textContent = text;
  statusLine.dataset.kind = kind;
}

function phaseClass(phase) {
  return PHASES.has(phase) ? `phase phase-${phase}` : "phase";
}

function showCaption(parts, s) {
  const control = s.control || NOBODY;
  parts.name.textContent = s.name;
  parts.phase.textContent = s.phase;
  parts.phase.className = phaseClass(s.phase);
  parts.control.textContent = control.label;
  parts.control.dataset.state = control.state;
  parts.goal.textContent = s.goal || "";
  parts.goal.title = s.goal || "";
  parts.goal.hidden = !s.goal;
}

// --- tiles -------------------------------------------------------------------------------

function element(tag, className, parent) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (parent) parent.append(node);
  return node;
}

function createTile(id) {
  const el = element("figure", "tile");
  el.dataset.sandboxId = String(id);
  el.dataset.frames = "0";
  el.tabIndex = 0;
  el.setAttribute("role", "listitem");
  const screen = element("div", "tile-screen", el);
  const img = element("img", "tile-image", screen);
  img.alt = "";
  img.hidden = true;
  const placeholder = element("span", "tile-placeholder", screen);
  const caption = element("figcaption", "tile-caption", el);
  const head = element("div", "tile-head", caption);
  const tile = {
    id,
    el,
    img,
    placeholder,
    url: null,
    frames: 0,
    name: element("span", "tile-name", head),
    phase: element("span", "phase", head),
    control: element("span", "control-badge tile-control", caption),
    goal: element("span", "tile-goal", caption),
  };
  const activate = () => (kiosk ? feature(id, true) : openViewer(id));
  el.addEventListener("click", activate);
  el.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      activate();
    }
  });
  tiles.set(id, tile);
  return tile;
}

function renderTile(tile, s) {
  showCaption(tile, s);
  tile.el.dataset.phase = s.phase;
  tile.el.setAttribute("aria-label", `${s.name}: ${s.phase}, ${(s.control || NOBODY).label}${s.goal ? `, ${s.goal}` : ""}`);
  const live = s.phase === "ready";
  tile.img.hidden = !tile.url;
  tile.placeholder.hidden = live && Boolean(tile.url);
  tile.placeholder.textContent = live ? "Waiting for the screen…" : `${s.phase}…`;
  tile.el.classList.toggle("tile-stale", !live && Boolean(tile.url));
}

function removeTile(id) {
  const tile = tiles.get(id);
  if (!tile) return;
  tile.el.remove();
  if (tile.url) URL.revokeObjectURL(tile.url);
  tiles.delete(id);
}

function update(list) {
  sandboxes.clear();
  for (const s of list) sandboxes.set(s.id, s);
  for (const id of [...tiles.keys()]) if (!sandboxes.has(id)) removeTile(id);
  const ordered = list.map((s) => {
    const tile = tiles.get(s.id) || createTile(s.id);
    renderTile(tile, s);
    return tile.el;
  });
  // Re-append only when the order changed: moving a focused tile would lose its focus.
  if (ordered.some((el, i) => grid.children[i] !== el)) grid.replaceChildren(...ordered);
  empty.hidden = list.length > 0;
  if (count) count.textContent = list.length === 1 ? "1 live sandbox" : `${list.length} live sandboxes`;
  fit();
  if (kiosk) followActivity();
  refreshViewer();
}

// The most tiles that fit the window without scrolling, as large as possible; below a
// readable size the grid scrolls instead.
const MIN_TILE = 220;
const GAP = 12;
const CAPTION = 90;
function fit() {
  if (kiosk) {
    root.style.setProperty("--strip-cols", grid.children.length > 4 ? "2" : "1");
    return;
  }
  const n = grid.children.length;
  if (!n) return;
  const width = grid.clientWidth;
  const height = window.innerHeight - grid.getBoundingClientRect().top - 16;
  let best = 0;
  let bestCols = 1;
  for (let cols = 1; cols <= n; cols++) {
    const rows = Math.ceil(n / cols);
    const byWidth = (width - GAP * (cols - 1)) / cols;
    const byHeight = ((height - GAP * (rows - 1)) / rows - CAPTION) * 1.6;
    const size = Math.min(byWidth, byHeight);
    if (size > best) [best, bestCols] = [size, cols];
  }
  grid.style.gridTemplateColumns = best >= MIN_TILE
    ? `repeat(${bestCols}, ${Math.floor(best)}px)`
    : `repeat(auto-fill, minmax(${MIN_TILE}px, 1fr))`;
}
window.addEventListener("resize", fit);

// --- thumbnails ----------------------------------------------------------------------------

function thumbnail(ws, buffer) {
  const ack = () => {
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "ack", id }));
  };
  if (buffer.byteLength < 4) return;
  const id = new DataView(buffer).getUint32(0);
  const tile = tiles.get(id);
  if (!tile) {
    ack();
    return;
  }
  const previous = tile.url;
  const url = URL.createObjectURL(new Blob([new Uint8Array(buffer, 4)], { type: "image/jpeg" }));
  tile.url = url;
  tile.frames += 1;
  tile.el.dataset.frames = String(tile.frames);
  tile.img.src = url;
  if (viewer.id === id) viewer.image.src = url;
  const s = sandboxes.get(id);
  if (s) renderTile(tile, s);
  if (stage && stage.id === id) renderFeature();
  tile.img.decode().catch(() => {}).finally(() => {
    ack();
    if (previous) URL.revokeObjectURL(previous);
  });
}

// --- the full-size view (not in kiosk) ------------------------------------------------------

const viewer = {
  box: document.getElementById("wall-viewer"),
  name: document.getElementById("viewer-name"),
  phase: document.getElementById("viewer-phase"),
  control: document.getElementById("viewer-control"),
  goal: document.getElementById("viewer-goal"),
  status: document.getElementById("viewer-status"),
  image: document.getElementById("viewer-image"),
  live: document.getElementById("viewer-live"),
  id: null,
  screen: null,
  opener: null,
};

function liveView(container, id, onState) {
  container.replaceChildren();
  container.classList.add("pending");
  return showScreen(container, id, {
    viewOnly: true,
    onState: (text, kind) => {
      // Until the live screen draws, and if it cannot, the thumbnail shows through.
      container.classList.toggle("pending", kind !== "ok");
      onState(text, kind);
    },
  });
}

function stopLive(holder) {
  if (holder.screen) holder.screen.stop();
  holder.screen = null;
}

function openViewer(id) {
  const s = sandboxes.get(id);
  if (!s || !viewer.box) return;
  closeViewer(false);
  viewer.id = id;
  viewer.opener = document.activeElement;
  viewer.box.hidden = false;
  viewer.image.src = tiles.get(id)?.url || "";
  refreshViewer();
  document.getElementById("viewer-close").focus();
}

function refreshViewer() {
  if (viewer.id === null || !viewer.box) return;
  const s = sandboxes.get(viewer.id);
  if (!s) {
    stopLive(viewer);
    viewer.status.textContent = "This sandbox is no longer live.";
    viewer.phase.textContent = "stopped";
    viewer.phase.className = phaseClass("stopped");
    return;
  }
  showCaption(viewer, s);
  if (s.phase === "ready" && !viewer.screen) {
    viewer.screen = liveView(viewer.live, s.id, (text) => { viewer.status.textContent = text; });
  } else if (s.phase !== "ready" && viewer.screen) {
    stopLive(viewer);
    viewer.status.textContent = `The sandbox is ${s.phase}.`;
  }
}

function closeViewer(restoreFocus = true) {
  if (viewer.id === null) return;
  stopLive(viewer);
  viewer.live.replaceChildren();
  viewer.box.hidden = true;
  viewer.id = null;
  viewer.status.textContent = "";
  if (restoreFocus && viewer.opener && document.contains(viewer.opener)) viewer.opener.focus();
}

document.getElementById("viewer-close")?.addEventListener("click", () => closeViewer());
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") closeViewer();
});

// --- kiosk -----------------------------------------------------------------------------------

const stage = kiosk ? {
  box: document.getElementById("kiosk-feature"),
  image: document.getElementById("feature-image"),
  live: document.getElementById("feature-live"),
  placeholder: document.getElementById("feature-placeholder"),
  name: document.getElementById("feature-name"),
  phase: document.getElementById("feature-phase"),
  control: document.getElementById("feature-control"),
  goal: document.getElementById("feature-goal"),
  next: document.getElementById("feature-next"),
  id: null,
  liveFor: null,
  screen: null,
  timer: null,
  shown: new Set(), // the sandboxes featured in this round
} : null;

function activity(s) {
  return Date.parse(s.activity || "") || 0;
}

// The next to feature: the most recently active sandbox not yet featured in this round
// (ready ones first); when all were, a new round begins.
function pickNext() {
  const all = [...sandboxes.values()];
  if (!all.length) return null;
  let candidates = all.filter((s) => !stage.shown.has(s.id));
  if (!candidates.length) {
    stage.shown = new Set();
    candidates = all.length > 1 ? all.filter((s) => s.id !== stage.id) : all;
  }
  candidates.sort((a, b) => (b.phase === "ready") - (a.phase === "ready") || activity(b) - activity(a));
  return candidates[0].id;
}

function feature(id, byHand = false) {
  clearTimeout(stage.timer);
  stage.timer = setTimeout(() => feature(pickNext()), rotateMs);
  if (id === null) {
    stage.id = null;
    stopLive(stage);
    stage.liveFor = null;
    stage.image.hidden = true;
    stage.placeholder.hidden = false;
    stage.placeholder.textContent = "Waiting for live sandboxes…";
    for (const part of [stage.name, stage.phase, stage.control, stage.goal, stage.next]) part.textContent = "";
    stage.control.hidden = true;
    return;
  }
  if (byHand) stage.shown = new Set();
  stage.shown.add(id);
  stage.id = id;
  for (const tile of tiles.values()) tile.el.classList.toggle("featured", tile.id === id);
  tiles.get(id)?.el.scrollIntoView({ block: "nearest" });
  renderFeature();
}

function renderFeature() {
  const s = sandboxes.get(stage.id);
  if (!s) return;
  showCaption(stage, s);
  stage.control.hidden = false;
  const url = tiles.get(s.id)?.url;
  if (url && stage.image.src !== url) stage.image.src = url;
  stage.image.hidden = !url;
  const ready = s.phase === "ready";
  stage.placeholder.hidden = ready && Boolean(url);
  stage.placeholder.textContent = ready ? "Waiting for the screen…" : `${s.name} is ${s.phase}…`;
  if (ready && stage.liveFor !== s.id) {
    stopLive(stage);
    stage.liveFor = s.id;
    stage.screen = liveView(stage.live, s.id, () => {});
  } else if (!ready && stage.liveFor !== null) {
    stopLive(stage);
    stage.liveFor = null;
    stage.live.replaceChildren();
  }
  const others = sandboxes.size - 1;
  stage.next.textContent = others > 0 ? `${others} more, each for ${Math.round(rotateMs / 1000)} s` : "";
}

function followActivity() {
  if (stage.id === null || !sandboxes.has(stage.id)) feature(pickNext());
  else renderFeature();
}

if (kiosk) {
  feature(null);
  // Browsers allow full screen only from a gesture: the first click or key asks again.
  const fullScreen = () => {
    if (!document.fullscreenElement && document.documentElement.requestFullscreen) {
      document.documentElement.requestFullscreen().catch(() => {});
    }
  };
  fullScreen();
  document.addEventListener("click", fullScreen, { once: true });
  document.addEventListener("keydown", fullScreen, { once: true });
  // The pointer hides when still.
  let still = null;
  document.addEventListener("mousemove", () => {
    document.body.classList.remove("pointer-still");
    clearTimeout(still);
    still = setTimeout(() => document.body.classList.add("pointer-still"), 3000);
  });
}

// --- the socket --------------------------------------------------------------------------------

keepConnected((onClose) => {
  const ws = new WebSocket(wsUrl("/ws/wall/")); // with the page's share token, if any
  ws.binaryType = "arraybuffer";
  let open = false;
  ws.addEventListener("open", () => {
    open = true;
    setStatus("", "ok");
  });
  ws.addEventListener("message", (event) => {
    if (typeof event.data !== "string") {
      thumbnail(ws, event.data);
      return;
    }
    const message = JSON.parse(event.data);
    if (message.type === "sandboxes") update(message.sandboxes);
  });
  ws.addEventListener("close", (event) => onClose(event.code, event.reason, open));
}, {
  onRetry: (code, reason, delay) => setStatus(`${describeClose(code, reason)}; reconnecting in ${Math.round(delay / 100) / 10} s…`, "retry"),
  onFinal: (code, reason) => setStatus(`Disconnected: ${describeClose(code, reason)}`, "final"),
});
