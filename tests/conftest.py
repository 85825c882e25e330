import os

import pytest
import torch

import fasteval
from fasteval import _loader


def available_devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


DEVICES = available_devices()


def requires_kernel(op, device):
    """Skip unless fasteval::<op> has a compiled kernel for the device (never skip on an import error:
    if the library was expected to load, test_loader fails instead)."""
    return pytest.mark.skipif(not _loader.has_kernel(op, device),
                              reason=f"no compiled fasteval::{op} kernel for {device} ({_loader.reason()})")


def pytest_report_header(config):
    return (f"fasteval backend: {fasteval.backend()} ({_loader.reason() or 'loaded'}); "
            f"FASTEVAL_DISABLE_EXT={os.environ.get('FASTEVAL_DISABLE_EXT', '0')}; torch {torch.__version__}")
