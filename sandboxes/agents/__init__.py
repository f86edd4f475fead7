"""Agents that drive a sandbox's Chromium: browser-use, with an LLM or a scripted model.

- ``steps``: the step-file format the scripted model plays (no browser-use needed).
- ``scripted``: ``ScriptedModel``, a browser-use chat model that answers with the next step.
- ``llm``: the chat model configured from the environment (``NAMEK_LLM_*``).
- ``runner``: ``python -m sandboxes.agents.runner``, the process that runs one agent and
  talks to Namek over the agent bridge websocket.

Nothing here imports Django: the runner also runs inside a sandbox pod or on a laptop.
browser-use reads its environment when it is first imported, so call
``prepare_browser_use_env`` before anything imports ``browser_use``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# Set before browser-use is imported: no telemetry, version checks, cloud calls or
# pricing downloads (the machines are offline), and leave the root logger alone.
OFFLINE_ENV = {
    "ANONYMIZED_TELEMETRY": "false",
    "BROWSER_USE_VERSION_CHECK": "false",
    "BROWSER_USE_CLOUD_SYNC": "false",
    "BROWSER_USE_CLOUD_HINTS": "false",
    "BROWSER_USE_CALCULATE_COST": "false",
    "BROWSER_USE_SETUP_LOGGING": "false",
}


def prepare_browser_use_env(config_dir: str | Path, temp_dir: str | Path | None = None) -> None:
    """Point browser-use at ``config_dir`` (and temporary files at ``temp_dir``), offline.

    Must run before ``browser_use`` is first imported; raises RuntimeError otherwise,
    since browser-use would already have read the old values.
    """
    if "browser_use" in sys.modules:
        raise RuntimeError("browser_use was imported before its environment was prepared")
    os.environ.update(OFFLINE_ENV)
    Path(config_dir).mkdir(parents=True, exist_ok=True)
    os.environ["BROWSER_USE_CONFIG_DIR"] = str(config_dir)
    if temp_dir is not None:
        # browser-use leaves per-run screenshot and file-system directories in the temp dir.
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
        os.environ["TMPDIR"] = str(temp_dir)
        tempfile.tempdir = str(temp_dir)
