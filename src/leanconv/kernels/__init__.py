"""Kernels: the Triton kernels (imported only when Triton is installed and the
``triton`` backend runs) and ``hetconv_direct*.cpp``, the CPU HetConv kernel (one
file per x86 vector ISA plus a portable one, all from ``hetconv_direct_kernel.h``) that
``leanconv.ops.hetconv_direct`` compiles into one extension. Launchers and autograd live in ``leanconv.ops``.
"""

__all__: list[str] = []
