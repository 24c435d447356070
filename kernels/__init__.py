"""Triton kernels for nanollama3: fused attention (kernels/attention.py) and RMSNorm (kernels/rmsnorm.py)."""
