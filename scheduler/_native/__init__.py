"""Compiled kernels built from kernels/*.pyx (see setup.py)."""
