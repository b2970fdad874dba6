"""Convolution specs as the command line writes them: ``kind[:option=value,...]``.

Examples: ``standard``, ``hetconv:p=4``, ``hetconv:p=4,layout=shifted``,
``bsconv_s:p=0.25``, ``gwpw:g=4``. A list of specs is comma-separated too
(``standard,hetconv:p=2,hetconv:p=4,dsc,gwpw:g=4``): a piece with ``=`` but
no ``:`` is another option of the spec before it.

The kinds and the options each accepts are those of
:func:`leanconv.layers.make_conv` (which takes a spec in place of a kind): ``standard``
and every layer class that names itself with ``kind = "..."`` (a
:class:`~leanconv.layers.LeanConvLayer` registers on definition, :func:`register_kind`);
values are read as int, float,
``true``/``false`` or, failing those, kept as strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "CONV_KINDS", "KIND_OPTIONS", "ConvSpec", "check_kind_options", "kind_class", "kind_divisor", "parse_conv_spec",
    "parse_conv_specs",
    "register_kind", "resolve_conv",
]


@dataclass(frozen=True)
class _Kind:
    options: frozenset  # accepted beyond nn.Conv2d's arguments
    required: dict  # option -> what it is, for the error; "a|b": either spelling
    cls: type | None  # None: nn.Conv2d itself


_KINDS: dict[str, _Kind] = {"standard": _Kind(frozenset(), {}, None)}


def register_kind(name: str, cls: type, options, required: dict | None = None) -> None:
    """Make ``name`` a conv kind built by ``cls.from_spec`` (``make_conv``, ``convert``, the
    zoo's ``conv=``), accepting ``options`` and needing ``required`` (option -> meaning)."""
    _KINDS[name] = _Kind(frozenset(options), dict(required or {}), cls)


def kind_divisor(kind: str, options: dict) -> tuple[str | None, tuple[str, ...]]:
    """(the option of ``kind`` that must divide channels, spelled as in ``options``; the
    channels it divides: "in_channels", "out_channels"), or (None, ()) for a kind without one."""
    cls = _KINDS[kind].cls
    spellings = getattr(cls, "kind_divisor", ())
    if not spellings:
        return None, ()
    return next((s for s in spellings if s in options), spellings[0]), tuple(cls.kind_divides)


def kind_class(kind: str) -> type | None:
    """The class that builds ``kind`` (None for ``standard``: nn.Conv2d)."""
    return _KINDS[kind].cls


def __getattr__(name: str):
    # The kinds registered so far (every leanconv kind once leanconv.layers is imported).
    if name == "CONV_KINDS":
        return tuple(_KINDS)
    if name == "KIND_OPTIONS":
        return {kind: info.options for kind, info in _KINDS.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_kind_options(kind: str, options: dict) -> None:
    """ValueError for an unknown kind, an option that belongs to another kind, or a
    required option missing."""
    if kind not in _KINDS:
        raise ValueError(f"conv kind must be one of {tuple(_KINDS)}, got {kind!r}")
    info = _KINDS[kind]
    unknown = sorted(set(options) - info.options)
    if unknown:
        allowed = sorted(info.options) or "none"
        raise ValueError(f"option(s) {unknown} do not apply to conv kind {kind!r} (its options: {allowed})")
    for names, meaning in info.required.items():
        spellings = names.split("|")
        if all(options.get(n) is None for n in spellings):
            alias = f" (or {', '.join(spellings[1:])})" if len(spellings) > 1 else ""
            raise ValueError(f"conv kind {kind!r} needs the option {spellings[0]}{alias} ({meaning}), got none")


# nn.Conv2d's keyword arguments (make_conv passes them through; the rest are the kind's options).

# Options with two spellings: the second is the first's alias.
_ALIASES = {"g": "groups"}


@dataclass(frozen=True)
class ConvSpec:
    """A conv kind and its options; ``str(spec)`` is the canonical text form."""

    kind: str
    options: dict = field(default_factory=dict)

    def with_options(self, **extra) -> ConvSpec:
        """A copy with ``extra`` options added (None values are ignored)."""
        merged = dict(self.options)
        merged.update({k: v for k, v in extra.items() if v is not None})
        return ConvSpec(self.kind, merged)

    def check(self) -> ConvSpec:
        """Raise ValueError unless the spec is complete (e.g. hetconv has p)."""
        check_kind_options(self.kind, self.options)
        return self

    def __str__(self) -> str:
        if not self.options:
            return self.kind
        return self.kind + ":" + ",".join(f"{k}={_format(v)}" for k, v in self.options.items())


def _format(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_conv_spec(text: str, *, complete: bool = False) -> ConvSpec:
    """``"hetconv:p=4"`` -> ``ConvSpec("hetconv", {"p": 4})``.

    Unknown kinds, malformed options and options of another kind raise
    ValueError naming the spec. With ``complete=True`` required options
    (HetConv's ``p``, GWPW's ``g``) must be present too.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"conv spec must be a non-empty string like 'hetconv:p=4', got {text!r}")
    kind, _, rest = text.strip().partition(":")
    kind = kind.strip()
    if kind not in _KINDS:
        raise ValueError(f"conv spec {text!r}: kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    options: dict = {}
    for piece in filter(None, (p.strip() for p in rest.split(","))):
        name, equals, value = piece.partition("=")
        name, value = name.strip(), value.strip()
        if not equals or not name or not value:
            raise ValueError(f"conv spec {text!r}: options are written name=value, got {piece!r}")
        if name not in _KINDS[kind].options:
            allowed = ", ".join(sorted(_KINDS[kind].options)) or "none"
            raise ValueError(f"conv spec {text!r}: option {name!r} does not apply to {kind!r} (its options: {allowed})")
        if name in options:
            raise ValueError(f"conv spec {text!r}: option {name!r} given twice")
        options[name] = _parse_value(value)
    spec = ConvSpec(kind, options)
    return spec.check() if complete else spec


def parse_conv_specs(text: str, *, complete: bool = True) -> list[ConvSpec]:
    """``"standard,hetconv:p=2,layout=shifted,dsc"`` -> three specs."""
    pieces: list[str] = []
    for piece in (p.strip() for p in str(text).split(",")):
        if not piece:
            continue
        if pieces and ":" not in piece and "=" in piece:
            pieces[-1] += "," + piece
        else:
            pieces.append(piece)
    if not pieces:
        raise ValueError(f"conv list must name at least one conv spec (e.g. 'standard,hetconv:p=4'), got {text!r}")
    return [parse_conv_spec(piece, complete=complete) for piece in pieces]


def resolve_conv(kind_or_spec: str, options: dict | None = None, *, argument: str = "kind") -> tuple[str, dict]:
    """``("hetconv:p=4", {"layout": "shifted"})`` -> ``("hetconv", {"p": 4, "layout": "shifted"})``.

    ``kind_or_spec`` is a kind name or a spec; ``options`` are keyword options
    given beside it. A keyword that repeats a spec option with the same value
    is fine; with another value it is a ValueError naming both (``g`` and
    ``groups`` count as one option). None-valued keywords are ignored. The
    result is checked complete (HetConv has ``p``, GWPW its groups) and free
    of other kinds' options.
    """
    if not isinstance(kind_or_spec, str):
        raise ValueError(f"{argument} must be a conv kind or spec string such as 'hetconv:p=4' "
                         f"(kinds: {', '.join(_KINDS)}), got {kind_or_spec!r}")
    spec = parse_conv_spec(kind_or_spec)
    merged = dict(spec.options)
    for name, value in (options or {}).items():
        if value is None:
            continue
        canonical = _ALIASES.get(name, name)
        given = [key for key in merged if _ALIASES.get(key, key) == canonical]
        if given and merged[given[0]] != value:
            raise ValueError(f"{name}={value!r} contradicts the conv spec {kind_or_spec!r} "
                             f"({given[0]}={merged[given[0]]!r}); give the option once")
        if not given:
            merged[name] = value
    check_kind_options(spec.kind, merged)
    return spec.kind, merged
