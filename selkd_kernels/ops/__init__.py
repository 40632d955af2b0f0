"""The package's compute ops, one subpackage per op.

Each op's folder holds its pure-PyTorch ``reference`` (the definition of the right answer), one
module per compiled backend (``cpp``, ``triton``), and ``api`` with the public entry point that
validates arguments and dispatches through :mod:`selkd_kernels.ops.registry`.
"""
