"""Test set-up shared by every test file.

TRITON_INTERPRET=1 must be set before anything imports triton: it makes the Triton kernels
run on CPU tensors (slowly, in numpy), so the kernels are tested on machines without a GPU.
On a machine with CUDA we leave it unset, so the same tests run the compiled kernels."""
import os
import subprocess
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
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so failures reproduce."""
    torch.manual_seed(0)


@pytest.fixture
def peak_growth():
    """peak_growth(setup, step): runs the Python source `setup`, then `step`, in a fresh process in the repository
    root, and returns by how many bytes `step` raised the process's peak RSS (a fresh process: no earlier test's
    peak hides it)."""
    def run(setup, step):
        code = (f"import resource\n{setup}\nbefore = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n{step}\n"
                "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n")
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return int(r.stdout)
    return run
