"""Where HetConv's KxK kernels sit: the blocked and shifted layouts.

HetConv (Singh et al., "HetConv: Heterogeneous Kernel-Based Convolutions for
Deep CNNs", CVPR 2019, https://arxiv.org/abs/1903.04120): each of the N filters
has M/P kernels of size KxK and M - M/P kernels of size 1x1 over the M input
channels. With Mg = M/P and Ng = N/P, filter n belongs to group g(n) and has its
KxK kernels on the Mg input channels of that group:

* ``blocked``: g(n) = n // Ng, channels of group g are g*Mg, ..., (g+1)*Mg - 1.
  This is the layout a grouped convolution (groups = P) computes directly.
* ``shifted`` (the paper's figure): g(n) = n mod P, channels of group g are
  g, g + P, g + 2P, ...; i.e. filter n has KxK kernels on the channels c with
  (c - n) mod P == 0, and consecutive filters shift by one.

Both store their parameters the same way: ``weight[n, j]`` is the KxK kernel on
channel ``kxk_channel_index[n, j]`` and ``pointwise_weight[n, k]`` the 1x1
weight on channel ``pointwise_channel_index[n, k]`` (the complementary channels
in increasing order).

The two layouts are the same layer up to a permutation of input and output
channels, sigma_C(c) = (c mod P) * (C/P) + c // P: a shifted layer S and the
blocked layer B with ``B.dense[sigma_N(n), sigma_M(c)] = S.dense[n, c]`` satisfy
``B(x_b)[:, sigma_N(n)] = S(x)[:, n]`` where ``x_b[:, sigma_M(c)] = x[:, c]``.
"""

from __future__ import annotations

import functools

import torch

from .tracing import assume_constant_result

__all__ = [
    "LAYOUTS",
    "check_layout",
    "check_hetconv_channels",
    "filter_group",
    "group_channels",
    "kxk_channel_index",
    "pointwise_channel_index",
    "group_channel_order",
    "group_filter_order",
    "channel_permutation",
    "materialize_dense_weight",
    "zero_diagonal_pointwise",
    "extract_hetconv_weights",
    "convert_layout",
]

LAYOUTS = ("blocked", "shifted")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def check_hetconv_channels(in_channels: int, out_channels: int, p: int) -> None:
    """Validate the part P against the channel counts (ValueError/TypeError)."""
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(p, bool) or not isinstance(p, int):
        raise TypeError(f"p must be an int (the HetConv part P), got {p!r}")
    if p < 1:
        raise ValueError(f"p must be >= 1 (p=1 is a standard convolution), got {p}")
    if in_channels % p:
        raise ValueError(f"p must divide in_channels: in_channels={in_channels} is not divisible by p={p}")
    if out_channels % p:
        raise ValueError(f"p must divide out_channels: out_channels={out_channels} is not divisible by p={p}")


def filter_group(n: int, out_channels: int, p: int, layout: str) -> int:
    """The group g(n) of filter n."""
    return n // (out_channels // p) if layout == "blocked" else n % p


def group_channels(g: int, in_channels: int, p: int, layout: str) -> list[int]:
    """The input channels on which the filters of group g have KxK kernels."""
    mg = in_channels // p
    return list(range(g * mg, (g + 1) * mg)) if layout == "blocked" else list(range(g, in_channels, p))


@functools.lru_cache(maxsize=256)
def _index_tables(in_channels: int, out_channels: int, p: int, layout: str) -> tuple[torch.Tensor, ...]:
    """(kxk_channel_index, pointwise_channel_index, channel_order, filter_order) on the CPU.

    Cached for the process, so built outside inference mode even when first asked
    for inside it: an inference tensor could not be saved for a later backward."""
    with torch.inference_mode(False):
        return _build_index_tables(in_channels, out_channels, p, layout)


def _build_index_tables(in_channels: int, out_channels: int, p: int, layout: str) -> tuple[torch.Tensor, ...]:
    check_layout(layout)
    check_hetconv_channels(in_channels, out_channels, p)
    kxk_rows, pointwise_rows = [], []
    for n in range(out_channels):
        own = group_channels(filter_group(n, out_channels, p, layout), in_channels, p, layout)
        own_set = set(own)
        kxk_rows.append(own)
        pointwise_rows.append([c for c in range(in_channels) if c not in own_set])
    channel_order = [c for g in range(p) for c in group_channels(g, in_channels, p, layout)]
    filter_order = group_filter_order_list(out_channels, p, layout)
    tables = (
        torch.tensor(kxk_rows, dtype=torch.long).reshape(out_channels, in_channels // p),
        torch.tensor(pointwise_rows, dtype=torch.long).reshape(out_channels, in_channels - in_channels // p),
        torch.tensor(channel_order, dtype=torch.long),
        torch.tensor(filter_order, dtype=torch.long),
    )
    return tables


@functools.lru_cache(maxsize=256)
def _index_tables_on(in_channels: int, out_channels: int, p: int, layout: str, device: torch.device):
    with torch.inference_mode(False):
        return tuple(t.to(device) for t in _index_tables(in_channels, out_channels, p, layout))


# A pure function of Python ints: torch.compile runs it once and keeps the result.
@assume_constant_result
def _tables(in_channels, out_channels, p, layout, device):
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cpu":
        return _index_tables(in_channels, out_channels, p, layout)
    return _index_tables_on(in_channels, out_channels, p, layout, device)


def kxk_channel_index(in_channels: int, out_channels: int, p: int, layout: str, device=None) -> torch.Tensor:
    """(N, M/P) long tensor: the input channel of each KxK kernel of each filter."""
    return _tables(in_channels, out_channels, p, layout, device)[0]


def pointwise_channel_index(in_channels: int, out_channels: int, p: int, layout: str, device=None) -> torch.Tensor:
    """(N, M - M/P) long tensor: the input channel of each 1x1 kernel of each filter."""
    return _tables(in_channels, out_channels, p, layout, device)[1]


def group_channel_order(in_channels: int, out_channels: int, p: int, layout: str, device=None) -> torch.Tensor:
    """(M,) long tensor listing the input channels group by group (identity for blocked)."""
    return _tables(in_channels, out_channels, p, layout, device)[2]


def group_filter_order_list(out_channels: int, p: int, layout: str) -> list[int]:
    """The filters group by group, as Python ints (what :func:`group_filter_order` holds)."""
    return [n for g in range(p) for n in range(out_channels) if filter_group(n, out_channels, p, layout) == g]


def group_filter_order(in_channels: int, out_channels: int, p: int, layout: str, device=None) -> torch.Tensor:
    """(N,) long tensor listing the filters group by group (identity for blocked)."""
    return _tables(in_channels, out_channels, p, layout, device)[3]


def channel_permutation(channels: int, p: int, device=None) -> torch.Tensor:
    """sigma_C as a (C,) long tensor: sigma[c] = (c mod P) * (C/P) + c // P.

    It maps a shifted-layout channel to its blocked-layout position."""
    c = torch.arange(channels, device=device)
    return (c % p) * (channels // p) + c // p


def materialize_dense_weight(
    weight: torch.Tensor, pointwise_weight: torch.Tensor, p: int, layout: str
) -> torch.Tensor:
    """The (N, M, kh, kw) weight of the ordinary convolution that equals the HetConv.

    ``weight`` (N, M/P, kh, kw) goes to the KxK positions, ``pointwise_weight``
    (N, M - M/P) to the centre tap of the other channels; every other entry is
    zero. Differentiable with respect to both inputs.
    """
    out_channels, per_group, kh, kw = weight.shape
    in_channels = per_group * p
    kxk_index = kxk_channel_index(in_channels, out_channels, p, layout, weight.device)
    pointwise_index = pointwise_channel_index(in_channels, out_channels, p, layout, weight.device)
    rows = torch.arange(out_channels, device=weight.device)[:, None]
    dense = weight.new_zeros(out_channels, in_channels, kh, kw)
    dense = dense.index_put((rows.expand_as(kxk_index), kxk_index), weight)
    if pointwise_index.numel():
        centre_h = torch.full_like(pointwise_index, kh // 2)
        centre_w = torch.full_like(pointwise_index, kw // 2)
        dense = dense.index_put(
            (rows.expand_as(pointwise_index), pointwise_index, centre_h, centre_w), pointwise_weight
        )
    return dense


def _insert_zero_diagonal(blocks: torch.Tensor, lead: tuple[int, ...], p: int, width: int) -> torch.Tensor:
    """(*lead, P, P-1, width) -> (*lead, P, P, width): row i gets a zero block
    inserted at position i. Built from concatenations and reshapes only (no
    indexed write), with every size a Python int, so that it is cheap to
    differentiate and both ONNX exporters fold it into a constant: flatten the
    (P, P-1) grid, view it as (P-1, P), append a zero block to each row,
    flatten, prepend one zero block, view as (P, P)."""
    factory = dict(dtype=blocks.dtype, device=blocks.device)
    grid = blocks.reshape(*lead, p - 1, p, width)
    grid = torch.cat([grid, torch.zeros(*lead, p - 1, 1, width, **factory)], dim=-2)
    grid = torch.cat([torch.zeros(*lead, 1, width, **factory), grid.reshape(*lead, (p - 1) * (p + 1), width)], dim=-2)
    return grid.reshape(*lead, p, p, width)


def zero_diagonal_pointwise(
    pointwise_weight: torch.Tensor, in_channels: int, out_channels: int, p: int, layout: str
) -> torch.Tensor:
    """(N, M) matrix: ``pointwise_weight`` (N, M - M/P) on each filter's other
    channels, zero on its own KxK channels. Differentiable; sizes come from the
    arguments, never from tensor shapes (traced graphs keep them constant).

    * blocked: filter n = g*Ng + i owns channel block g; its row is the P-1
      blocks of Mg channels with a zero block inserted at position g.
    * shifted: filter n = q*P + r owns the channels c = r (mod P); within each
      run of P consecutive channels its row has a zero inserted at position r.
    """
    mg, ng = in_channels // p, out_channels // p
    if p == 1:
        return pointwise_weight.new_zeros(out_channels, in_channels)
    if layout == "blocked":
        # (P groups, Ng filters, P-1 blocks, Mg) -> (Ng, P, P-1, Mg) -> insert -> (P, Ng, P, Mg)
        blocks = pointwise_weight.reshape(p, ng, p - 1, mg).transpose(0, 1)
        return _insert_zero_diagonal(blocks, (ng,), p, mg).transpose(0, 1).reshape(out_channels, in_channels)
    # shifted: (Ng q, P r, Mg runs, P-1) -> (Ng, Mg, P r, P-1, 1) -> insert -> (Ng, Mg, P, P)
    runs = pointwise_weight.reshape(ng, p, mg, p - 1).transpose(1, 2).unsqueeze(-1)
    matrix = _insert_zero_diagonal(runs, (ng, mg), p, 1).squeeze(-1)
    return matrix.transpose(1, 2).reshape(out_channels, in_channels)


def extract_hetconv_weights(
    dense: torch.Tensor, p: int, layout: str, *, check_structure: bool = True, atol: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`materialize_dense_weight`: read ``(weight, pointwise_weight)``
    out of a dense (N, M, kh, kw) weight.

    With ``check_structure`` a ValueError is raised when ``dense`` has a non-zero
    (beyond ``atol``) entry outside HetConv's pattern, so nothing is silently lost.
    """
    if dense.dim() != 4:
        raise ValueError(f"dense weight must be 4-D (N, M, kh, kw), got shape {tuple(dense.shape)}")
    out_channels, in_channels, kh, kw = dense.shape
    check_hetconv_channels(in_channels, out_channels, p)
    kxk_index = kxk_channel_index(in_channels, out_channels, p, layout, dense.device)
    pointwise_index = pointwise_channel_index(in_channels, out_channels, p, layout, dense.device)
    rows = torch.arange(out_channels, device=dense.device)[:, None]
    weight = dense[rows.expand_as(kxk_index), kxk_index]
    pointwise = dense[rows.expand_as(pointwise_index), pointwise_index, kh // 2, kw // 2]
    if check_structure:
        residual = dense - materialize_dense_weight(weight, pointwise, p, layout)
        worst = residual.abs().max().item() if residual.numel() else 0.0
        if worst > atol:
            raise ValueError(
                f"dense weight is not a {layout} HetConv weight with p={p}: an entry off the HetConv "
                f"pattern has magnitude {worst:.3g} (> atol={atol})"
            )
    return weight.contiguous(), pointwise.contiguous()


def convert_layout(
    weight: torch.Tensor, pointwise_weight: torch.Tensor, p: int, source: str, target: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-express one layer's weights in the other layout.

    Going shifted -> blocked, the result B satisfies
    ``B.dense[sigma_N(n), sigma_M(c)] = S.dense[n, c]`` (see the module
    docstring), so ``B(x[:, inv(sigma_M)])[:, sigma_N] == S(x)``: the layer is
    the same up to permuting its input channels by sigma_M and its output
    channels by sigma_N. Blocked -> shifted applies the inverse permutations.
    """
    check_layout(source)
    check_layout(target)
    if source == target:
        return weight, pointwise_weight
    dense = materialize_dense_weight(weight, pointwise_weight, p, source)
    out_channels, in_channels = dense.shape[:2]
    sigma_out = channel_permutation(out_channels, p, dense.device)
    sigma_in = channel_permutation(in_channels, p, dense.device)
    converted = torch.empty_like(dense)
    if source == "shifted":
        converted[sigma_out[:, None], sigma_in[None, :]] = dense
    else:
        converted = dense[sigma_out[:, None], sigma_in[None, :]]
    return extract_hetconv_weights(converted, p, target)
