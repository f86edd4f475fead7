// The agent bar of the sandbox page: start a run (a task for the LLM, or a demo step
// file), and pause, resume (with a note) or stop the active one. Its state follows the
// agent.* events of the log, so every viewer sees the same.
//
// Who drives is the control banner's business (control.js): while a person drives or is
// taking over, or while the banner offers "Resume agent", this bar hides its own Pause
// and Resume (setControl); Stop stays. A user who may not use the sandbox (a viewer)
// only sees the agent's state.
import { api } from "./common.js";

export function mountAgentBar(form, sandboxId, initialRun, { mayUse = true } = {}) {
  const state = form.querySelector("#agent-state");
  const start = form.querySelector(".agent-start");
  const controls = form.querySelector(".agent-controls");
  const pauseButton = form.querySelector("#pause-button");
  const resumeButton = form.querySelector("#resume-button");
  const stopButton = form.querySelector("#stop-button");
  const note = form.elements.note;
  let run = initialRun; // {id, status, steps, ...} or null
  let control = null; // the control banner's state (control.js), once known

  function show(text, kind) {
    state.textContent = text;
    state.dataset.kind = kind || "";
  }

  function render() {
    const active = run && ["pending", "running", "paused"].includes(run.status);
    // A person drives or takes over: the banner owns pausing and resuming.
    const personal = control !== null && ["pending", "person", "you"].includes(control.state);
    start.hidden = Boolean(active) || !mayUse;
    controls.hidden = !active || !mayUse;
    pauseButton.hidden = !active || run.status !== "running" || personal;
    resumeButton.hidden = !active || run.status !== "paused" || personal || Boolean(control?.may?.resume);
    note.hidden = resumeButton.hidden;
    if (!run) return;
    if (run.status === "pending") show(`Run #${run.id}: starting the agent…`);
    if (run.status === "running") show(`Run #${run.id}: agent driving${run.steps ? `, step ${run.steps}` : ""}`, "ok");
    if (run.status === "paused") {
      const driver = personal ? (control.state === "you" ? "you drive" : `${control.user || "someone"} drives`) : "";
      show(`Run #${run.id}: paused${driver ? ` while ${driver}` : ""}`, "retry");
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {};
    const task = form.elements.task.value.trim();
    if (task) body.task = task;
    if (form.elements.demo.value) body.demo = form.elements.demo.value;
    form.querySelector("#run-button").disabled = true;
    try {
      run = await api("POST", `/api/sandboxes/${sandboxId}/runs`, body);
      form.elements.task.value = "";
      render();
    } catch (error) {
      show(`Could not start the agent: ${error.message}`, "final");
    } finally {
      form.querySelector("#run-button").disabled = false;
    }
  });

  async function command(name, body) {
    try {
      run = await api("POST", `/api/runs/${run.id}/${name}`, body);
      render();
    } catch (error) {
      show(`Could not ${name} the agent: ${error.message}`, "final");
    }
  }
  pauseButton.addEventListener("click", () => {
    show(`Run #${run.id}: pausing after the step in flight…`, "retry");
    command("pause");
  });
  resumeButton.addEventListener("click", () => {
    command("resume", { note: note.value });
    note.value = "";
  });
  stopButton.addEventListener("click", () => command("stop"));

  render();
  return {
    // Called with the control banner's state whenever it changes.
    setControl(state) {
      control = state;
      // A run the log has not told of yet (the banner's answer came first).
      if (state.run && (!run || run.id < state.run.id)) run = { id: state.run.id, status: state.run.status, steps: 0 };
      render();
    },
    // Called with every event of the log, old and new, in order.
    onEvent(event) {
      if (!event.kind.startsWith("agent.") || typeof event.data?.run !== "number") return;
      if (!run || run.id !== event.data.run) run = { id: event.data.run, status: "pending", steps: 0 };
      if (event.kind === "agent.started" || event.kind === "agent.resumed") run.status = "running";
      if (event.kind === "agent.step") {
        run.status = "running";
        run.steps = event.data.step;
      }
      if (event.kind === "agent.paused") run.status = "paused";
      if (event.kind === "agent.done") {
        run.status = "done";
        show(`Run #${run.id} done: ${event.data.result || "no result given"}`, "ok");
      }
      if (event.kind === "agent.failed") {
        run.status = "failed";
        show(`Run #${run.id} failed: ${event.data.error || "no reason given"}`, "final");
      }
      render();
    },
  };
}
