// The sandbox's shell: xterm.js over /ws/sandboxes/<id>/terminal/ (protocol in
// viewer/consumers/terminal.py: JSON arrays ["stdin", text], ["set_size", rows, cols],
// ["ack", n] up; ["setup", {...}], ["stdout", text], ["disconnect", code] down).
//
// Every viewer shares one tmux session in the sandbox; on (re)connect tmux redraws it.
// Output is acknowledged once xterm.js has parsed it, so a busy tab makes tmux wait
// instead of the server buffering for it. xterm.js's stylesheet is added to the page
// on first use.
import { Terminal } from "../vendor/xterm/xterm.mjs";
import { FitAddon } from "../vendor/xterm/addon-fit.mjs";
import { describeClose, keepConnected, wsUrl } from "./common.js";

const ACK_DELAY_MS = 20;
const STYLESHEET = new URL("../vendor/xterm/xterm.css", import.meta.url).href;

function ensureStylesheet() {
  if ([...document.styleSheets].some((sheet) => sheet.href === STYLESHEET)) return;
  if (document.querySelector("link[data-xterm]")) return;
  document.head.append(Object.assign(document.createElement("link"), { rel: "stylesheet", href: STYLESHEET }));
  document.head.lastElementChild.dataset.xterm = "";
}

// Shows the shell in `container`, reconnecting by itself until a final close code.
// onState(text, kind) reports progress: kind is "ok", "retry" or "final".
export function mountTerminal(container, sandboxId, { onState = () => {} } = {}) {
  ensureStylesheet();
  const term = new Terminal({
    cursorBlink: true,
    scrollback: 5000,
    fontFamily: "ui-monospace, 'DejaVu Sans Mono', 'Liberation Mono', monospace",
    fontSize: window.matchMedia("(min-width: 2500px)").matches ? 22 : 13, // a wall screen reads from afar
    theme: { background: "#111111" },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(container);
  fit.fit();

  let ws = null;
  let readonly = true;
  const send = (message) => {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
  };
  term.onData((data) => { if (!readonly) send(["stdin", data]); });
  term.onResize(({ rows, cols }) => send(["set_size", rows, cols]));
  const observer = new ResizeObserver(() => {
    if (container.offsetParent !== null) fit.fit();  // hidden panes have no size
  });
  observer.observe(container);

  const keeper = keepConnected((onClose) => {
    const socket = new WebSocket(wsUrl(`/ws/sandboxes/${sandboxId}/terminal/`));
    ws = socket;
    let open = false;
    let parsed = 0;  // stdout messages xterm.js has taken in, on this socket
    let ackTimer = null;
    const ack = () => {
      ackTimer = null;
      if (ws === socket) send(["ack", parsed]);
    };
    socket.addEventListener("open", () => { open = true; });
    socket.addEventListener("message", (event) => {
      if (typeof event.data !== "string") return;
      const [kind, payload] = JSON.parse(event.data);
      if (kind === "setup") {
        readonly = payload.readonly;
        term.options.disableStdin = readonly;
        term.reset();  // tmux redraws the whole screen for a new client
        send(["set_size", term.rows, term.cols]);
        onState(readonly ? "Live (read-only)" : "Live", "ok");
      } else if (kind === "stdout") {
        term.write(payload, () => {
          parsed += 1;
          if (ackTimer === null) ackTimer = setTimeout(ack, ACK_DELAY_MS);
        });
      }
    });
    socket.addEventListener("close", (event) => {
      clearTimeout(ackTimer);
      if (ws === socket) ws = null;
      onClose(event.code, event.reason, open);
    });
  }, {
    onRetry: (code, reason, delay) => onState(`${describeClose(code, reason)}; reconnecting in ${Math.round(delay / 100) / 10} s…`, "retry"),
    onFinal: (code, reason) => onState(`Disconnected: ${describeClose(code, reason)}`, "final"),
  });

  return {
    stop() {
      keeper.stop();
      observer.disconnect();
      if (ws) ws.close();
      term.dispose();
    },
    focus() { term.focus(); },
    fit() { fit.fit(); },
  };
}
