"""Measured memory: run the workload an estimate describes with real PyTorch code.

Everything here imports torch lazily; without it ``require_torch`` raises a one-line error.
"""

from __future__ import annotations

from memcalc.errors import InputError


def require_torch():
    try:
        import torch
    except ImportError:
        raise InputError("validation needs PyTorch: pip install 'memcalc[validate]'") from None
    return torch
