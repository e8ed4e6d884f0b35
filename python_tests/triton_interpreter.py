"""Run a test script under Triton's CPU interpreter (TRITON_INTERPRET=1).

The variable must be set before triton is imported, and the test process has
imported it already (hart_fast imports it lazily, pytest plugins may not), so
the kernels run in a fresh interpreter process. The script signals success by
printing OK; its assertion messages come back in the failure text.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_triton_interpreter(script: str, timeout: int = 300) -> None:
    try:
        import triton  # noqa: F401
    except ImportError as e:  # part of the README's install (".[all]"), so not a skip
        pytest.fail(f"triton is not installed ({e}); install hart_fast with its [all] extras")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.dirname(os.path.abspath(__file__)), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
