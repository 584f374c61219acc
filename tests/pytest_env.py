"""Loaded with `-p tests.pytest_env` (pytest.ini) so it runs before pytest-django imports the settings.

Setting these in conftest.py would be too late: the settings would already hold
the defaults, and test clean-up would remove the "default" instance's containers.
"""

import os
import signal

os.environ.setdefault("LSL_INSTANCE", f"test-{os.getpid()}")
os.environ.setdefault("LSL_THROTTLE_USER", "100000/min")
os.environ.setdefault("LSL_THROTTLE_ANON", "100000/min")
os.environ.setdefault("LSL_THROTTLE_LOGIN", "100000/min")
os.environ.setdefault("LSL_THROTTLE_AUTH_FAILURES", "100000/min")  # tests/test_throttling.py sets its own rates
# The suite runs every environment it makes on this (2-core) machine's engine; placement capacity is
# tested with explicit --cpus (tests/test_nodes.py), not by running out of it here.
os.environ.setdefault("LSL_NODE_CPU_OVERCOMMIT", "64")

# A shell starts a background job (`cmd &`, nohup, some CI runners) with SIGINT ignored, and an ignored
# signal stays ignored across exec: every `lsl` the CLI tests start would then shrug off their Ctrl-C
# and those tests fail for a reason that is not LSL's. Python's own handler is reset to the default by
# exec, so the processes the tests start get a normal SIGINT again.
signal.signal(signal.SIGINT, signal.default_int_handler)
