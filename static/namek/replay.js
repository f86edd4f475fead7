// The replay of an agent run (viewer/replay.py): a timeline to scrub and play, the
// screenshot of the current step large, the screen recording beside it kept at the same
// moment. The same script runs in Namek's page and inlined in the exported HTML file, so
// it is a classic script (no modules: an exported file opens from disk) and it requests
// nothing but the URLs in its data: this Namek's API and recording routes in the page,
// data: URLs in the export.
//
// Keys: ← and → previous and next event, space play or pause, Home and End.
// Everything the run says goes in with textContent: markup in it stays text.
(function () {
  "use strict";

  const data = JSON.parse(document.getElementById("replay-data").textContent);
  const $ = (id) => document.getElementById(id);
  const items = data.items || [];
  const duration = Math.max(Number(data.duration) || 0, 0.1);
  const root = $("replay");
  const scrub = $("replay-scrub");
  const lanes = $("replay-lanes");
  const list = $("replay-items");
  const image = $("replay-image");
  const noShot = $("replay-noshot");
  const caption = $("replay-caption");
  const detail = $("replay-detail");
  const clockOut = $("replay-clock");
  const playButton = $("replay-play");
  const speedSelect = $("replay-speed");
  const video = $("replay-video");
  const noVideo = $("replay-novideo");
  const videoState = $("replay-video-state");

  // Only ever inlined data, or (in Namek's page, not in an export) this Namek's own routes.
  const exported = data.exported === true;
  function allowed(value, inlined, route) {
    if (typeof value !== "string") return null;
    if (value.startsWith(inlined)) return value;
    return !exported && value.startsWith(route) ? value : null;
  }
  const imageUrl = (value) => allowed(value, "data:image/", "/api/sandboxes/");
  const videoUrl = (value) => allowed(value, "data:video/", "/sandboxes/");

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function clock(seconds) {
    const whole = Math.max(0, Math.floor(seconds));
    const h = Math.floor(whole / 3600);
    const m = Math.floor((whole % 3600) / 60);
    const s = String(whole % 60).padStart(2, "0");
    return h ? `${h}:${String(m).padStart(2, "0")}:${s}` : `${m}:${s}`;
  }

  const percent = (offset) => Math.min(100, Math.max(0, (offset / duration) * 100));

  function label(item) {
    if (item.kind === "agent.step") return `Step ${item.step ?? "?"}`;
    return item.kind;
  }

  // An item's time, kind (in a `kindTag` element) and actor, appended to `head`.
  function itemHead(head, item, kindTag) {
    head.append(
      element("time", "replay-item-time", clock(item.offset)),
      element(kindTag, "replay-item-kind", label(item)),
      element("span", "replay-item-actor", item.actor),
    );
    return head;
  }

  // --- the lanes over the scrubber ----------------------------------------------------------

  function lane(name, className) {
    const row = element("div", `replay-lane ${className}`);
    row.append(element("span", "replay-lane-name", name));
    const track = element("div", "replay-lane-track");
    row.append(track);
    lanes.append(row);
    return track;
  }

  function marker(track, item, index, className) {
    const button = element("button", `replay-marker ${className}`);
    button.type = "button";
    button.style.left = `${percent(item.offset)}%`;
    button.title = `${clock(item.offset)} ${label(item)}: ${item.text}`;
    button.setAttribute("aria-label", button.title);
    button.addEventListener("click", () => { pause(); seek(item.offset); });
    button.dataset.index = String(index);
    track.append(button);
    return button;
  }

  // Spans that overlap go on rows of their own within the lane.
  function stack(spans) {
    const ends = [];
    return spans.map((span) => {
      let row = ends.findIndex((end) => end <= span.start);
      if (row < 0) row = ends.push(0) - 1;
      ends[row] = span.end;
      return row;
    });
  }

  function bands(track, spans, describe) {
    const rows = stack(spans);
    const count = Math.max(1, ...rows.map((row) => row + 1));
    track.parentElement.style.height = `${count * 22 + 4}px`;
    spans.forEach((span, index) => {
      const { className, text, title, facts } = describe(span);
      const node = element("button", `replay-band ${className}`);
      node.type = "button";
      const left = percent(span.start);
      node.style.left = `${left}%`;
      node.style.width = `${Math.max(0.6, percent(span.end) - left)}%`;
      node.style.top = `${rows[index] * 22 + 3}px`;
      node.append(element("span", "replay-band-label", text));
      node.title = title;
      node.setAttribute("aria-label", title);
      node.addEventListener("click", () => {
        pause();
        seek(Math.max(0, span.start));
        showFacts(title, facts);
      });
      track.append(node);
    });
  }

  const agentTrack = lane("Agent", "lane-agent");
  const controlTrack = lane("Control", "lane-control");
  const terminalTrack = lane("Terminal", "lane-terminal");
  const failureTrack = lane("Failures", "lane-failures");

  items.forEach((item, index) => {
    if (item.failure) marker(failureTrack, item, index, "marker-failure");
    if (item.category === "step") marker(agentTrack, item, index, "marker-step");
    else if (item.category === "agent") marker(agentTrack, item, index, "marker-agent");
    else if (item.category === "control") marker(controlTrack, item, index, "marker-control");
  });
  const inputsOf = (span) => (span.inputs ? Object.values(span.inputs).reduce((a, b) => a + b, 0) : 0);
  bands(controlTrack, data.takeovers || [], (span) => {
    const how = String(span.ended || "ended").replace("_", " ");
    const until = span.open ? "still driving" : `${how}${span.ended_by ? ` by ${span.ended_by}` : ""}`;
    return {
      className: "band-takeover",
      text: span.note ? `${span.user}: ${span.note}` : span.user,
      title: `${span.user} drove ${clock(span.start)}–${clock(span.end)} (${span.seconds} s; ${until})`,
      facts: [
        ["Who", span.user],
        ["Asked", clock(span.start)],
        ["Drove", span.granted === null ? "never granted" : `${clock(span.granted)}–${clock(span.end)}, ${span.seconds} s`],
        ["Ended", until],
        ["Inputs", `${inputsOf(span)} (${Object.entries(span.inputs || {}).map(([k, v]) => `${k} ${v}`).join(", ")})`],
        ["Note", span.note],
      ],
    };
  });
  bands(terminalTrack, data.terminals || [], (session) => {
    const who = `${session.user}${session.readonly ? " (read-only)" : ""}`;
    return {
      className: session.readonly ? "band-terminal band-readonly" : "band-terminal",
      text: who,
      title: `Terminal of ${who} ${clock(session.start)}–${clock(session.end)}${session.open ? " (still open)" : ""}`,
      facts: [["Who", who], ["Attached", `${session.seconds} s${session.open ? ", still open" : ""}`]],
    };
  });
  const playhead = element("div", "replay-playhead");
  lanes.append(playhead);

  // --- the list of everything ---------------------------------------------------------------

  const rows = items.map((item, index) => {
    const row = element("li", `replay-item category-${item.category}${item.failure ? " is-failure" : ""}`);
    row.dataset.kind = item.kind;
    row.dataset.index = String(index);
    const button = element("button", "replay-item-button");
    button.type = "button";
    const head = itemHead(element("span", "replay-item-head"), item, "span");
    button.append(head, element("span", "replay-item-text", item.text));
    const thumbnail = imageUrl(item.thumbnail);
    if (thumbnail) {
      const small = element("img", "replay-item-thumb");
      small.alt = `Screenshot of ${label(item)}`;
      small.loading = "lazy";
      small.src = thumbnail;
      button.append(small);
    }
    button.addEventListener("click", () => { pause(); seek(item.offset, index); });
    row.append(button);
    list.append(row);
    return row;
  });
  if (!items.length) list.append(element("li", "replay-empty", "Nothing was logged during this run."));

  // --- where we are ---------------------------------------------------------------------------

  let position = 0;
  let current = -2;
  let pinned = null; // an item chosen from the list: shown even if others share its time
  let shownShot;
  let playing = false;
  let speed = "1";
  let lastFrame = 0;
  let stepClock = 0;

  // The last item at or before t.
  function indexAt(t) {
    let low = 0;
    let high = items.length - 1;
    let found = -1;
    while (low <= high) {
      const middle = (low + high) >> 1;
      if (items[middle].offset <= t + 1e-6) {
        found = middle;
        low = middle + 1;
      } else {
        high = middle - 1;
      }
    }
    return found;
  }

  function shotAt(index) {
    for (let i = index; i >= 0; i -= 1) {
      if (imageUrl(items[i].screenshot) || (items[i].screenshot_left_out && imageUrl(items[i].thumbnail))) return i;
    }
    return -1;
  }

  function showDetail(item) {
    detail.replaceChildren();
    if (!item) {
      detail.append(element("p", "replay-empty", "The run is about to start."));
      return;
    }
    const head = itemHead(element("div", "replay-detail-head"), item, "strong");
    detail.append(head, element("p", "replay-detail-text", item.text));
    const facts = element("dl", "replay-facts");
    const add = (name, value) => {
      if (value === undefined || value === null || value === "" || (Array.isArray(value) && !value.length)) return;
      facts.append(element("dt", "", name));
      if (Array.isArray(value)) {
        const dd = element("dd");
        const ul = element("ul", "replay-actions");
        for (const line of value) ul.append(element("li", "", line));
        dd.append(ul);
        facts.append(dd);
      } else {
        facts.append(element("dd", "", value));
      }
    };
    const more = item.detail || {};
    add("Goal", more.goal);
    add("Evaluation", more.evaluation);
    add("Actions", more.actions);
    add("Page", [more.title, more.url].filter(Boolean).join(" · "));
    add("Error", more.error);
    add("Result", more.result);
    add("Note", more.note);
    if (facts.children.length) detail.append(facts);
  }

  // A take-over or terminal session chosen on the timeline, until the position moves on.
  function showFacts(title, facts) {
    detail.replaceChildren(element("p", "replay-detail-text", title));
    const table = element("dl", "replay-facts");
    for (const [name, value] of facts) {
      if (value === undefined || value === null || value === "") continue;
      table.append(element("dt", "", name), element("dd", "", value));
    }
    detail.append(table);
  }

  function showShot(index) {
    if (index === shownShot) return;
    shownShot = index;
    if (index < 0) {
      image.hidden = true;
      image.removeAttribute("src");
      noShot.hidden = false;
      caption.textContent = "";
      return;
    }
    const item = items[index];
    const full = imageUrl(item.screenshot);
    image.src = full || imageUrl(item.thumbnail);
    image.alt = `Screenshot of ${label(item)} at ${clock(item.offset)}`;
    image.dataset.seq = String(item.seq);
    image.hidden = false;
    noShot.hidden = true;
    const where = item.detail && item.detail.url ? ` · ${item.detail.url}` : "";
    caption.textContent = `${label(item)} at ${clock(item.offset)}${where}${full ? "" : " (thumbnail: the full screenshot was left out of the export)"}`;
  }

  // Scroll the list (not the window) so that the row shows.
  function reveal(row) {
    if (row.offsetTop < list.scrollTop) list.scrollTop = row.offsetTop;
    else if (row.offsetTop + row.offsetHeight > list.scrollTop + list.clientHeight) {
      list.scrollTop = row.offsetTop + row.offsetHeight - list.clientHeight;
    }
  }

  function render() {
    scrub.value = String(Math.round(position * 1000));
    scrub.setAttribute("aria-valuetext", `${clock(position)} of ${clock(duration)}`);
    clockOut.textContent = `${clock(position)} / ${clock(duration)}`;
    playhead.style.setProperty("--at", String(percent(position) / 100));
    let index = indexAt(position);
    if (pinned !== null && Math.abs(items[pinned].offset - position) < 1e-3) index = pinned;
    else pinned = null;
    if (index !== current) {
      rows[current]?.classList.remove("is-current");
      rows[current]?.removeAttribute("aria-current");
      current = index;
      if (rows[index]) {
        rows[index].classList.add("is-current");
        rows[index].setAttribute("aria-current", "step");
        reveal(rows[index]);
      }
      showDetail(items[index]);
      root.dataset.current = index >= 0 ? String(items[index].seq) : "";
    }
    showShot(shotAt(index));
    syncVideo(false);
  }

  function seek(t, index = null) {
    position = Math.min(duration, Math.max(0, t));
    pinned = index;
    render();
    syncVideo(true);
  }

  // --- the recording ---------------------------------------------------------------------------

  const recording = data.recording || {};
  const source = recording.available ? videoUrl(recording.url) : null;
  if (source) {
    video.src = source;
    video.hidden = false;
    noVideo.hidden = true;
    if (recording.note) $("replay-video-note").textContent = `· ${recording.note}`;
    video.addEventListener("loadedmetadata", () => syncVideo(true));
  } else {
    noVideo.textContent = recording.note || "No recording.";
  }

  function syncVideo(force) {
    if (!source || !video.readyState) return;
    const at = position - (Number(recording.offset) || 0);
    const length = Number.isFinite(video.duration) ? video.duration : Infinity;
    const outside = at < 0 || at > length;
    videoState.textContent = outside ? "Not recorded at this moment" : "";
    if (outside) {
      if (!video.paused) video.pause();
      return;
    }
    if (playing && speed !== "steps") {
      video.playbackRate = Number(speed);
      if (Math.abs(video.currentTime - at) > 0.6 || force) video.currentTime = at;
      if (video.paused) video.play().catch(() => {});
    } else {
      if (!video.paused) video.pause();
      if (force || Math.abs(video.currentTime - at) > 0.05) video.currentTime = at;
    }
  }

  // --- playing -----------------------------------------------------------------------------

  function nextIndex(from, wanted) {
    for (let i = from + 1; i < items.length; i += 1) if (!wanted || wanted(items[i])) return i;
    return -1;
  }

  function frame(now) {
    if (!playing) return;
    const elapsed = Math.min(0.5, (now - lastFrame) / 1000);
    lastFrame = now;
    if (speed === "steps") {
      stepClock += elapsed;
      if (stepClock >= 1) {
        stepClock = 0;
        const next = nextIndex(indexAt(position), (item) => item.category === "step");
        if (next < 0) {
          position = duration;
          pause();
        } else {
          position = items[next].offset;
        }
      }
    } else {
      position = Math.min(duration, position + elapsed * Number(speed));
      if (position >= duration) pause();
    }
    render();
    if (playing) requestAnimationFrame(frame);
  }

  function play() {
    if (playing) return;
    if (position >= duration) position = 0;
    playing = true;
    lastFrame = performance.now();
    stepClock = 0;
    playButton.textContent = "Pause";
    playButton.setAttribute("aria-pressed", "true");
    root.dataset.playing = "true";
    syncVideo(true);
    requestAnimationFrame(frame);
  }

  function pause() {
    if (!playing) return;
    playing = false;
    playButton.textContent = "Play";
    playButton.setAttribute("aria-pressed", "false");
    root.dataset.playing = "false";
    syncVideo(true);
  }

  function step(direction) {
    pause();
    const here = indexAt(position);
    if (direction > 0) {
      // The next event later than now (several may share a moment: take the last of them).
      let next = here + 1;
      while (next < items.length && items[next].offset <= position + 1e-6) next += 1;
      seek(next < items.length ? items[next].offset : duration);
    } else {
      let previous = here;
      while (previous >= 0 && items[previous].offset >= position - 1e-6) previous -= 1;
      seek(previous >= 0 ? items[previous].offset : 0);
    }
  }

  scrub.max = String(Math.round(duration * 1000));
  scrub.addEventListener("input", () => seek(Number(scrub.value) / 1000));
  playButton.addEventListener("click", () => (playing ? pause() : play()));
  $("replay-prev").addEventListener("click", () => step(-1));
  $("replay-next").addEventListener("click", () => step(1));
  speedSelect.addEventListener("change", () => {
    speed = speedSelect.value;
    stepClock = 0;
    syncVideo(true);
  });
  // A click on the screenshot shows it over the whole window, another puts it back.
  image.addEventListener("click", () => root.classList.toggle("is-zoomed"));

  document.addEventListener("keydown", (event) => {
    const target = event.target;
    const typing = target instanceof HTMLElement
      && (target.isContentEditable || ["TEXTAREA", "SELECT"].includes(target.tagName)
        || (target.tagName === "INPUT" && target.type !== "range"));
    if (typing || event.altKey || event.ctrlKey || event.metaKey) return;
    if (event.key === "ArrowLeft") step(-1);
    else if (event.key === "ArrowRight") step(1);
    else if (event.key === " " || event.key === "Spacebar") {
      if (target instanceof HTMLButtonElement) return; // a focused button clicks itself
      if (playing) pause();
      else play();
    } else if (event.key === "Home") seek(0);
    else if (event.key === "End") seek(duration);
    else return;
    event.preventDefault();
  });

  // Start on the first step (or the first event), so that there is something to see.
  const first = items.findIndex((item) => item.category === "step");
  seek(first >= 0 ? items[first].offset : 0, first >= 0 ? first : null);
  root.dataset.ready = "true";
})();
