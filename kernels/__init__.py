"""Triton kernels that execute the controller's decisions: fused optimizer steps, casts, gradient stats."""
