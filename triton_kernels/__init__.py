"""Triton kernels of sparselora, installed as ``sparselora.triton_kernels``.

One kernel family per file, each with its launcher, autograd wiring and a reference
implementation close by. Importing this package never touches the GPU driver, so it imports
on CPU-only machines (and runs under ``TRITON_INTERPRET=1``).
"""
