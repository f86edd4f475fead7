"""Loaded with ``-p`` before Django's settings: tests never touch the developer's var/."""

import os
import tempfile

os.environ["NAMEK_DATA_DIR"] = tempfile.mkdtemp(prefix="namek-test-data-")
os.environ.pop("DATABASE_URL", None)
os.environ.pop("REDIS_URL", None)
os.environ.pop("SECRET_KEY", None)
