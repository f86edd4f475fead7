// The live screen: noVNC over Namek's relay (/ws/sandboxes/<id>/screen/).
//
// The relay asks every reader to acknowledge what it received ({"type": "ack",
// "bytes": N} text frames; see viewer/screen_relay.py), so that a slow browser makes
// the VNC server wait instead of filling the server's memory. noVNC accepts an already
// created WebSocket, so the acknowledgements ride on a second 'message' listener.
import RFB from "../vendor/novnc/core/rfb.js";
import { describeClose, keepConnected, wsUrl } from "./common.js";

// Half the smallest window the server allows (NAMEK_RELAY_WINDOW >= 2 MiB): few
// acknowledgements per full-screen update, and the window never fills while we read.
const ACK_EVERY_BYTES = 1024 * 1024;
const ACK_DELAY_MS = 50;

export function ackingSocket(url) {
  const ws = new WebSocket(url, ["binary"]);
  let received = 0;
  let acked = 0;
  let timer = null;
  const ack = () => {
    timer = null;
    if (ws.readyState === WebSocket.OPEN && received > acked) {
      acked = received;
      ws.send(JSON.stringify({ type: "ack", bytes: received }));
    }
  };
  ws.addEventListener("message", (event) => {
    if (typeof event.data === "string") return;
    received += event.data.byteLength;
    if (received - acked >= ACK_EVERY_BYTES) ack();
    else if (timer === null) timer = setTimeout(ack, ACK_DELAY_MS);
  });
  return ws;
}

// Shows the screen in `container`, reconnecting by itself until a final close code.
// onState(text, kind) reports progress: kind is "ok", "retry" or "final".
// onClipboard(text) gets what was copied in the sandbox (noVNC's "clipboard" event).
// viewOnly: noVNC sends no keys, pointer or clipboard (the server drops the input of
// anyone not driving anyway); setViewOnly() changes it, for this and later connections.
export function showScreen(container, sandboxId, { onState = () => {}, onClipboard = () => {}, viewOnly = true } = {}) {
  let rfb = null;
  const keeper = keepConnected((onClose) => {
    const ws = ackingSocket(wsUrl(`/ws/sandboxes/${sandboxId}/screen/`));
    let open = false;
    ws.addEventListener("open", () => { open = true; });
    ws.addEventListener("close", (event) => {
      rfb = null;
      onClose(event.code, event.reason, open);
    });
    rfb = new RFB(container, ws, { shared: true });
    rfb.scaleViewport = true;
    rfb.resizeSession = false;
    rfb.viewOnly = viewOnly;
    rfb.background = "#111";
    rfb.addEventListener("connect", () => onState("Live", "ok"));
    rfb.addEventListener("clipboard", (event) => onClipboard(String(event.detail?.text ?? "")));
  }, {
    onRetry: (code, reason, delay) => onState(`${describeClose(code, reason)}; reconnecting in ${Math.round(delay / 100) / 10} s…`, "retry"),
    onFinal: (code, reason) => onState(`Disconnected: ${describeClose(code, reason)}`, "final"),
  });
  return {
    stop() {
      keeper.stop();
      if (rfb) rfb.disconnect();
    },
    focus() { if (rfb) rfb.focus(); },
    get viewOnly() { return viewOnly; },
    setViewOnly(value) {
      viewOnly = Boolean(value);
      if (rfb) rfb.viewOnly = viewOnly;
    },
    // Sends `text` as the sandbox's clipboard (ClientCutText): Ctrl+V there pastes it.
    // False when there is no connection, or it is view-only.
    pasteClipboard(text) {
      if (!rfb || viewOnly) return false;
      rfb.clipboardPasteFrom(String(text));
      return true;
    },
  };
}
