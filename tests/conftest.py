import os
import subprocess
import sys
import warnings

import pytest

warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session")
def quick():
    from hwprune.measure import MeasureConfig

    return MeasureConfig.quick()


def run_cli(*args: str, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    """Run the real ``hwprune`` entry point in a subprocess."""
    e = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "hwprune", *args], capture_output=True, text=True,
                          timeout=timeout, env=e)
