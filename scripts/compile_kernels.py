"""Compile leanconv's Triton kernels for a CUDA GPU target, without a GPU.

The test suite runs the kernels under ``TRITON_INTERPRET=1``, which accepts some
code a GPU compile would refuse. This script builds each autotune configuration
(tile sizes, warps, stages, kernel variant) of every kernel for a CUDA
architecture (default sm_90, the H100/H200) with Triton's own compiler and its
bundled ptxas, and prints the compile time and the shared memory each
configuration needs. Exit status 1 if any configuration fails to build.

By default each kernel is specialised as Triton's launcher specialises it for a
channels_last input whose channel counts are multiples of 16 (the common case):
channel strides equal to 1 become constants, pointers, channel counts and the
other strides carry Triton's divisible-by-16 attribute (what enables its async
copies). ``--generic`` builds the unspecialised kernel (every int a plain i32).

    python scripts/compile_kernels.py                    # every configuration, bf16 and fp32 (~5 min)
    python scripts/compile_kernels.py --first --dtypes bf16   # one configuration per kernel and variant

It cannot run under ``TRITON_INTERPRET=1`` (the kernels are then interpreted
functions); it unsets the variable for itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (it warns otherwise)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from leanconv.kernels import depthwise, hetconv  # noqa: E402

POINTER = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def kernels(dtype: str):
    """(label, autotuned kernel, constexpr arguments) for every kernel at 3x3."""
    precision = "tf32" if dtype == "fp32" else "ieee"
    return [
        ("hetconv_fwd", hetconv.hetconv_fwd_kernel,
         dict(P=4, KH=3, KW=3, SHIFTED=True, HAS_BIAS=True, PRECISION=precision)),
        ("hetconv_dx", hetconv.hetconv_dx_kernel, dict(P=4, KH=3, KW=3, SHIFTED=True, PRECISION=precision)),
        ("hetconv_dw", hetconv.hetconv_dw_kernel, dict(P=4, KH=3, KW=3, SHIFTED=False, PRECISION=precision)),
        ("depthwise_fwd", depthwise.depthwise_fwd_kernel, dict(KH=3, KW=3, HAS_BIAS=True)),
        ("depthwise_dx", depthwise.depthwise_dx_kernel, dict(KH=3, KW=3)),
        ("depthwise_dw", depthwise.depthwise_dw_kernel, dict(KH=3, KW=3)),
    ]


# channels_last with channel counts that are multiples of 16: the channel strides are 1
# (Triton turns an int argument equal to 1 into a constant), these ints divisible by 16.
CHANNEL_STRIDES = {"sxc", "syc", "sdc"}
DIVISIBLE_INTS = {"M", "N", "Mg", "Ng", "C", "sxb", "sxh", "sxw", "syb", "syh", "syw", "sdb", "sdh", "sdw"}
DIVISIBLE = [["tt.divisibility", 16]]


def build(kernel, constants: dict, config: triton.Config, dtype: str, target: GPUTarget, generic: bool = False):
    """Compile one configuration; returns the compiled kernel (its metadata says the shared memory)."""
    jit = kernel.fn
    known = {**constants, **config.kwargs}
    if not generic:
        known.update({name: 1 for name in CHANNEL_STRIDES if name in jit.arg_names})
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(jit.arg_names):
        if name in known:
            signature[name], constexprs[name] = "constexpr", known[name]
            continue
        if name == "part_ptr":  # float32 partial sums of the weight gradients
            signature[name] = "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = POINTER[dtype]
        else:
            signature[name] = "i32"
        if not generic and (name.endswith("_ptr") or name in DIVISIBLE_INTS):
            attrs[(index,)] = DIVISIBLE
    source = ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target, options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def first_per_variant(configs):
    seen, kept = set(), []
    for config in configs:
        variant = tuple(sorted((k, v) for k, v in config.kwargs.items() if not k.startswith("BLOCK")))
        if variant not in seen:
            seen.add(variant)
            kept.append(config)
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200)")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp16, fp32")
    parser.add_argument("--first", action="store_true", help="one configuration per kernel and variant only")
    parser.add_argument("--only", default="", help="comma list of kernel labels (default: all)")
    parser.add_argument("--generic", action="store_true",
                        help="no launch specialisation (every int a plain i32, no divisibility attributes)")
    args = parser.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in POINTER]
    if bad:
        parser.error(f"--dtypes: unknown {bad}, allowed {sorted(POINTER)}")
    target = GPUTarget("cuda", args.arch, 32)
    only = {label.strip() for label in args.only.split(",") if label.strip()}
    failures = 0
    print(f"target sm_{args.arch}, Triton {triton.__version__}, "
          f"{'generic' if args.generic else 'specialised for channels_last, channels a multiple of 16'}")
    for dtype in dtypes:
        for label, kernel, constants in kernels(dtype):
            if only and label not in only:
                continue
            configs = first_per_variant(kernel.configs) if args.first else kernel.configs
            for config in configs:
                start = time.time()
                try:
                    compiled = build(kernel, constants, config, dtype, target, args.generic)
                except Exception as error:  # noqa: BLE001 - reported, counted, exit status 1
                    failures += 1
                    print(f"FAIL {label:14s} {dtype} {config.kwargs} {type(error).__name__}: {str(error)[:800]}")
                    continue
                print(f"ok   {label:14s} {dtype} {config.kwargs} warps {config.num_warps} stages {config.num_stages} "
                      f"{time.time() - start:5.1f} s  shared {compiled.metadata.shared:,} bytes", flush=True)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
