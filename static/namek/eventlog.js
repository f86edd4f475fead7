// The event log pane: /ws/sandboxes/<id>/events/, newest at the bottom.
//
// - Reconnects with ?after=<the last seq shown>, so nothing is missed or shown twice.
// - Keeps at most MAX_ROWS rows in the DOM, however long the log: older rows are dropped
//   from the top (the API still has them).
// - Follows live while the list is scrolled to the bottom; once the reader scrolls up it
//   stays put and a "new events" button counts what arrived below.
// - Everything an event says is put in with textContent: markup in it stays text.

import { describeClose, keepConnected, wsUrl } from "./common.js";

export const MAX_ROWS = 500;
const NEAR_BOTTOM = 24; // px: closer than this to the bottom counts as "at the bottom"

function relativeTime(at, now) {
  const seconds = Math.max(0, Math.round((now - at) / 1000));
  if (seconds < 5) return "just now";
  if (seconds < 60) return `${seconds} s ago`;
  const minutes = Math.round(seconds / 60);
  if (minutes < 60) return `${minutes} min ago`;
  const hours = Math.round(minutes / 60);
  if (hours < 24) return `${hours} h ago`;
  return new Date(at).toLocaleString();
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// A path of this Namek's API, or null: an event's URLs are only ever used as such.
function apiPath(value) {
  return typeof value === "string" && value.startsWith("/api/") ? value : null;
}

export function mountEventLog(container, sandboxId, { after = 0, onState, onEvent } = {}) {
  container.replaceChildren();
  const list = element("ol", "event-list");
  list.setAttribute("aria-live", "polite");
  const dropped = element("div", "event-dropped");
  dropped.hidden = true;
  const more = element("button", "event-more");
  more.type = "button";
  more.hidden = true;
  const viewer = element("dialog", "event-viewer");
  const viewerImage = element("img");
  viewerImage.alt = "Screenshot";
  const viewerCaption = element("p", "event-viewer-caption");
  const closeViewer = element("button", "", "Close");
  closeViewer.type = "button";
  viewer.append(viewerImage, viewerCaption, closeViewer);
  container.append(dropped, list, more, viewer);

  let last = after;
  let droppedCount = 0;
  let unseen = 0;
  let pending = [];
  let frame = 0;

  const atBottom = () => list.scrollTop + list.clientHeight >= list.scrollHeight - NEAR_BOTTOM;
  const scrollToBottom = () => { list.scrollTop = list.scrollHeight; };

  function openScreenshot(event) {
    viewerImage.src = apiPath(event.screenshot_url) || "";
    viewerCaption.textContent = `#${event.seq} ${event.kind}: ${event.text}`;
    viewer.showModal();
  }
  closeViewer.addEventListener("click", () => viewer.close());
  viewer.addEventListener("click", (e) => { if (e.target === viewer) viewer.close(); });

  function row(event) {
    const item = element("li", `event source-${event.source}`);
    item.dataset.seq = String(event.seq);
    item.dataset.kind = event.kind;
    const at = Date.parse(event.at);
    const time = element("time", "event-time", relativeTime(at, Date.now()));
    time.dateTime = event.at;
    time.title = new Date(at).toLocaleString();
    time.dataset.at = String(at);
    const head = element("div", "event-head");
    head.append(
      element("span", "event-kind", event.kind),
      element("span", "event-source", event.source),
      element("span", "event-actor", event.actor),
      time,
    );
    item.append(head, element("div", "event-text", event.text));
    // An ended run: its replay (viewer/replay.py).
    if ((event.kind === "agent.done" || event.kind === "agent.failed") && Number.isInteger(event.data?.run)) {
      const replay = element("a", "event-replay", "Replay this run");
      replay.href = `/sandboxes/${Number(sandboxId)}/runs/${event.data.run}/replay/`;
      replay.style.gridColumn = "1";
      item.append(replay);
    }
    const thumbnail = apiPath(event.thumbnail_url);
    if (thumbnail) {
      const button = element("button", "event-thumb");
      button.type = "button";
      button.title = "Enlarge the screenshot";
      const image = element("img");
      image.src = thumbnail;
      image.alt = `Screenshot of event ${event.seq}`;
      image.loading = "lazy";
      button.append(image);
      button.addEventListener("click", () => openScreenshot(event));
      item.append(button);
    }
    return item;
  }

  // Rows are added once per animation frame, however many events came meanwhile; only
  // the newest MAX_ROWS of a burst are ever built.
  function flush() {
    frame = 0;
    const follow = atBottom();
    let batch = pending;
    pending = [];
    if (batch.length > MAX_ROWS) {
      droppedCount += batch.length - MAX_ROWS;
      batch = batch.slice(-MAX_ROWS);
    }
    const fragment = document.createDocumentFragment();
    for (const event of batch) fragment.append(row(event));
    list.append(fragment);
    const excess = list.children.length - MAX_ROWS;
    for (let i = 0; i < excess; i += 1) list.firstElementChild.remove();
    droppedCount += Math.max(0, excess);
    if (droppedCount) {
      dropped.hidden = false;
      dropped.textContent = `${droppedCount} earlier event${droppedCount === 1 ? "" : "s"} not shown here (the API has them all)`;
    }
    if (follow) {
      scrollToBottom();
      unseen = 0;
    } else {
      unseen += batch.length;
    }
    more.hidden = unseen === 0;
    more.textContent = `↓ ${unseen} new event${unseen === 1 ? "" : "s"}`;
  }

  function receive(event) {
    if (typeof event.seq !== "number" || event.seq <= last) return; // never twice
    last = event.seq;
    onEvent?.(event);
    pending.push(event);
    if (!frame) frame = requestAnimationFrame(flush);
  }

  list.addEventListener("scroll", () => {
    if (atBottom() && unseen) {
      unseen = 0;
      more.hidden = true;
    }
  });
  more.addEventListener("click", () => {
    scrollToBottom();
    unseen = 0;
    more.hidden = true;
  });

  const clock = setInterval(() => {
    const now = Date.now();
    for (const time of list.querySelectorAll("time[data-at]")) {
      time.textContent = relativeTime(Number(time.dataset.at), now);
    }
  }, 15000);

  let current = null;
  const connection = keepConnected((onClose) => {
    const ws = new WebSocket(wsUrl(`/ws/sandboxes/${sandboxId}/events/?after=${last}`));
    let open = false;
    ws.addEventListener("open", () => { open = true; onState?.("Live"); });
    ws.addEventListener("message", (message) => receive(JSON.parse(message.data)));
    ws.addEventListener("close", (event) => onClose(event.code, event.reason, open));
    current = ws;
  }, {
    onRetry: (code, reason, delay) => onState?.(`Reconnecting in ${Math.round(delay / 1000)} s`),
    onFinal: (code, reason) => onState?.(`Stopped: ${describeClose(code, reason)}`),
  });

  return {
    get last() { return last; },
    get rows() { return list.children.length; },
    stop() {
      connection.stop();
      clearInterval(clock);
      if (frame) cancelAnimationFrame(frame);
      current?.close();
    },
  };
}
