// Splitters between the sandbox page's panes: drag them, or focus one and use the arrow
// keys. Each sets a CSS variable on the workspace (data-size) in pixels; the sizes are
// remembered per browser.

const STEP = 32; // px per arrow key press
const MIN = 160; // px: no pane gets smaller than this

function stored(name) {
  const value = Number(localStorage.getItem(`namek${name}`));
  return Number.isFinite(value) && value > 0 ? value : null;
}

export function enableSplitters(workspace) {
  for (const splitter of workspace.querySelectorAll(".splitter[data-size]")) {
    const name = splitter.dataset.size;
    const vertical = splitter.dataset.axis === "x";
    // The pane the variable sizes: for columns the side (after the splitter), for rows
    // the terminal (before it).
    const region = splitter.parentElement;

    function apply(px) {
      const total = vertical ? region.clientWidth : region.clientHeight;
      const clamped = Math.round(Math.min(Math.max(px, MIN), Math.max(MIN, total - MIN)));
      workspace.style.setProperty(name, `${clamped}px`);
      splitter.setAttribute("aria-valuenow", String(clamped));
      localStorage.setItem(`namek${name}`, String(clamped));
    }
    function current() {
      const box = (vertical ? splitter.nextElementSibling : splitter.previousElementSibling).getBoundingClientRect();
      return vertical ? box.width : box.height;
    }

    const saved = stored(name);
    if (saved) workspace.style.setProperty(name, `${saved}px`);

    splitter.addEventListener("pointerdown", (down) => {
      down.preventDefault();
      splitter.setPointerCapture(down.pointerId);
      const bounds = region.getBoundingClientRect();
      const move = (event) => {
        apply(vertical ? bounds.right - event.clientX : event.clientY - bounds.top);
      };
      const up = () => {
        splitter.removeEventListener("pointermove", move);
        splitter.removeEventListener("pointerup", up);
        splitter.removeEventListener("pointercancel", up);
      };
      splitter.addEventListener("pointermove", move);
      splitter.addEventListener("pointerup", up);
      splitter.addEventListener("pointercancel", up);
    });
    splitter.addEventListener("keydown", (event) => {
      const grow = vertical ? { ArrowLeft: STEP, ArrowRight: -STEP } : { ArrowDown: STEP, ArrowUp: -STEP };
      if (!(event.key in grow)) return;
      event.preventDefault();
      apply(current() + grow[event.key]);
    });
    splitter.addEventListener("dblclick", () => {
      workspace.style.removeProperty(name);
      localStorage.removeItem(`namek${name}`);
    });
  }
}
