"""Triton kernels, each with its autograd Function. Installed as `nanolora.kernels`.

Nothing outside nanolora/ops.py imports from here: ops.py holds the torch reference for each
kernel and decides which one runs.
"""
