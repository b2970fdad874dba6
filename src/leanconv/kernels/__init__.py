"""Triton kernels (and nothing else): imported only when Triton is installed and
the ``triton`` backend runs. Launchers and autograd live in ``leanconv.ops``.
"""

__all__: list[str] = []
