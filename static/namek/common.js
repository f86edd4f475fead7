// Helpers shared by Namek's pages: the JSON API and websockets that reconnect.

function cookie(name) {
  const match = document.cookie.match(new RegExp("(?:^|; )" + name + "=([^;]*)"));
  return match ? decodeURIComponent(match[1]) : "";
}

// Calls the JSON API with the session cookie and the CSRF header; throws Error(message)
// with the server's own explanation on any error status.
export async function api(method, path, body) {
  const options = { method, headers: { "X-CSRFToken": cookie("csrftoken") }, credentials: "same-origin" };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let data = null;
  try {
    data = await response.json();
  } catch {
    throw new Error(`${response.status} ${response.statusText}`);
  }
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

// The read-only share link's token of a shared page (a json_script "share-token" in the
// page), or "". Every websocket such a page opens carries it (wsUrl).
export function shareToken() {
  const element = document.getElementById("share-token");
  return element ? String(JSON.parse(element.textContent) || "") : "";
}

export function wsUrl(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const token = shareToken();
  const share = token ? `${path.includes("?") ? "&" : "?"}share=${encodeURIComponent(token)}` : "";
  return `${scheme}//${location.host}${path}${share}`;
}

// Close codes 4400-4499 mean "do not retry" (see viewer/closecodes.py).
export function isFinalClose(code) {
  return code >= 4400 && code < 4500;
}

// Keeps calling connect() with backoff until stop() or a final close code.
// connect(onClose) must open a socket and call onClose(code, reason) when it closes.
export function keepConnected(connect, { onFinal, onRetry } = {}) {
  let delay = 500;
  let stopped = false;
  let timer = null;
  function attempt() {
    if (stopped) return;
    connect((code, reason, wasOpen) => {
      if (stopped) return;
      if (isFinalClose(code)) {
        stopped = true;
        onFinal?.(code, reason);
        return;
      }
      if (wasOpen) delay = 500;
      onRetry?.(code, reason, delay);
      timer = setTimeout(attempt, delay);
      delay = Math.min(delay * 2, 10000);
    });
  }
  attempt();
  return { stop() { stopped = true; clearTimeout(timer); } };
}

export function describeClose(code, reason) {
  return reason || `connection closed (${code})`;
}

// Follows the dashboard feed (/ws/sandboxes/): onSnapshot(list) on every (re)connect,
// then onChange(sandbox) for each change, until a final close code (onFinal).
export function followSandboxes({ onSnapshot, onChange, onFinal }) {
  return keepConnected((onClose) => {
    const ws = new WebSocket(wsUrl("/ws/sandboxes/"));
    let open = false;
    ws.addEventListener("open", () => { open = true; });
    ws.addEventListener("message", (event) => {
      const message = JSON.parse(event.data);
      if (message.type === "snapshot") onSnapshot(message.sandboxes);
      else if (message.type === "sandbox") onChange(message.sandbox);
    });
    ws.addEventListener("close", (event) => onClose(event.code, event.reason, open));
  }, { onFinal });
}
