"""Fixtures and the machine record of the benchmark suites; plain helpers are in benchutil.py."""
import datetime

import pytest
import torch

from benchutil import device


@pytest.fixture
def dev():
    return device()


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what decides the numbers next to pytest-benchmark's CPU info: GPU and versions."""
    machine_info["date"] = datetime.date.today().isoformat()
    machine_info["torch"] = torch.__version__
    machine_info["cuda"] = torch.version.cuda
    machine_info["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        import triton
        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
