"""Settings for the test run: a throw-away data dir, offline swift, short timeouts.

Environment defaults are set before the real settings are read, so worker subprocesses started
by the tests (which inherit ``os.environ``) see the same configuration.
"""

import os
import tempfile
from pathlib import Path

_root = Path(os.environ.get("FINETUNE_TEST_ROOT") or tempfile.mkdtemp(prefix="ftp-test-"))
os.environ["FINETUNE_TEST_ROOT"] = str(_root)
os.environ.setdefault("FINETUNE_DATA_DIR", str(_root / "data"))
os.environ.setdefault("FINETUNE_MODEL_ROOTS", str(_root / "models"))
os.environ.setdefault("FINETUNE_OFFLINE", "1")
os.environ.setdefault("FINETUNE_STOP_GRACE_SECONDS", "5")
os.environ.setdefault("FINETUNE_POLL_SECONDS", "0.1")
os.environ.setdefault("FINETUNE_HEARTBEAT_SECONDS", "1")
os.environ.setdefault("FINETUNE_LOST_AFTER_SECONDS", "10")
os.environ.setdefault("FINETUNE_STOP_WAIT_SECONDS", "3")
os.environ.setdefault("FINETUNE_ENV_PASSTHROUGH", "FAKE_SWIFT_*")
os.environ.setdefault("FINETUNE_QUEUE_POLL_SECONDS", "0.1")
os.environ.setdefault("CHANNELS_PREFIX", f"ftp-test-{os.getpid()}")
(_root / "models").mkdir(parents=True, exist_ok=True)

from finetune_platform.settings import *  # noqa: E402, F403

# The test client's host (pytest-django adds it as well); a deployment's default never includes it.
ALLOWED_HOSTS = [*ALLOWED_HOSTS, "testserver"]  # noqa: F405
