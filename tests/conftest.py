"""Test set-up shared by every test file.

TRITON_INTERPRET=1 must be set before anything imports triton: it makes the Triton kernels
run on CPU tensors (slowly, in numpy), so the kernels are tested on machines without a GPU.
On a machine with CUDA we leave it unset, so the same tests run the compiled kernels."""
import os
import sys

import pytest

try:  # torch is a hard dependency; only its cuda check decides the interpreter
    import torch
    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the repo root on sys.path, so `import tokenizer`, `import kernels.attention` work from tests/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so failures reproduce."""
    torch.manual_seed(0)
