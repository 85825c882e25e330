import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import fasteval  # noqa: E402
from fasteval import _loader  # noqa: E402


def available_devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


DEVICES = available_devices()


def pytest_report_header(config):
    return (f"fasteval backend: {fasteval.backend()} ({_loader.reason() or 'loaded'}); "
            f"FASTEVAL_DISABLE_EXT={os.environ.get('FASTEVAL_DISABLE_EXT', '0')}; torch {torch.__version__}")
