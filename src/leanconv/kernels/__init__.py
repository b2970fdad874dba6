"""Kernels: the Triton kernels (imported only when Triton is installed and the
``triton`` backend runs) and ``hetconv_direct.cpp``, the CPU HetConv kernel that
``leanconv.ops.hetconv_direct`` compiles. Launchers and autograd live in ``leanconv.ops``.
"""

__all__: list[str] = []
