"""The benchmark harness on tiny inputs: it runs end to end, gates on
correctness and writes complete files. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import leanconv
from leanconv import bench
from leanconv.cli import main
from leanconv.ops import hetconv_direct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_time_interleaved_runs_in_rounds_and_summarises():
    order = []
    ticks = iter(range(1000))
    timings = bench.time_interleaved(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")},
        warmup=1, repeats=3, clock=lambda: float(next(ticks)),
    )
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert set(timings) == {"a", "b"}
    assert timings["a"].repeats == 3 and timings["a"].median == 1.0 and timings["a"].spread == 0.0


def test_timing_statistics():
    t = bench.Timing.from_samples([4.0, 1.0, 3.0, 2.0, 100.0])
    assert (t.minimum, t.median, t.maximum) == (1.0, 3.0, 100.0)
    assert t.q1 == 2.0 and t.q3 == 4.0 and t.spread == pytest.approx(2 / 3)
    assert t.rounds == (4.0, 1.0, 3.0, 2.0, 100.0)  # in round order


def test_per_round_ratio_cancels_a_load_that_moves_both_sides():
    from leanconv.bench.timing import per_round_ratio

    load = [1.0, 3.0, 1.5, 2.0, 5.0]  # the machine slows down and speeds up between rounds
    standard = [2.0 * x for x in load]
    variant = [x for x in load]
    assert per_round_ratio(standard, variant) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="same rounds"):
        per_round_ratio(standard, variant[:-1])


def test_peak_memory_sees_a_temporary_allocation():
    def step():
        a = torch.ones(1 << 20)  # 4 MiB
        del a
        return torch.ones(16)

    assert bench.peak_allocated_bytes(step) >= 4 << 20


def test_layer_grid_gates_every_candidate_and_fills_rows():
    rows = bench.bench_layer_grid([bench.LayerConfig(8, 8, 6, 4, 2)], warmup=0, repeats=1)
    candidates = {r["candidate"] for r in rows}
    assert {"conv2d", "hetconv:auto", "hetconv:auto-measured", "hetconv:reference", "hetconv:split", "seed",
            "p_branch", "public_loop"} <= candidates
    assert {r["mode"] for r in rows if r["candidate"] == "public_loop"} == {"infer"}
    assert {(r["mode"], r["format"]) for r in rows} == {
        (m, f) for m in ("infer", "train") for f in ("channels_last", "contiguous")
    }
    for row in rows:
        assert row["gate"] == "pass", row
        assert row["median_ms"] > 0 and row["macs"] > 0
    het = next(r for r in rows if r["candidate"] == "hetconv:split")
    assert het["macs"] == 2 * 6 * 6 * 8 * (2 * 9 + 6)  # B*Ho*Wo*N*(M/P*K*K + M - M/P)


def test_separable_rows():
    rows = bench.bench_separable_config(8, 8, 6, 2, warmup=0, repeats=1, modes=("infer",), formats=("contiguous",))
    assert [r["candidate"] for r in rows] == ["conv2d", "dsc", "bsconv_u", "bsconv_s"]
    assert rows[1]["macs"] == 2 * 36 * 8 * (9 + 8)


def tiny_zoo(name, conv="standard", p=None):
    """A two-conv stand-in for leanconv.models.create."""
    options = {} if conv == "standard" else {"p": p}
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        leanconv.make_conv(conv, 8, 8, 3, padding=1, **options), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


def test_model_bench_gates_times_and_measures_memory():
    variants = bench.build_variants(tiny_zoo, "tiny", [4], seed_ps=[4])
    assert set(variants) == {"standard", "hetconv_p4", "seed_p4"}
    rows = bench.bench_models(variants, input_shape=(2, 3, 8, 8), warmup=0, repeats=2)
    assert len(rows) == 3 * 2 * 2
    for row in rows:
        assert row["gate"] in ("pass", "n/a") and row["median_ms"] > 0
        assert len(row["round_ms"]) == 2 and row["per_round_speedup_q1"] <= row["per_round_speedup"] <= row["per_round_speedup_q3"]
        if row["mode"] == "train":
            assert row["peak_step_mib"] > 0
    het = next(r for r in rows if r["model_variant"] == "hetconv_p4")
    assert het["macs"] < next(r for r in rows if r["model_variant"] == "standard")["macs"]
    assert het["backends"]


def test_model_gate_refuses_a_wrong_fast_path(monkeypatch):
    variants = bench.build_variants(tiny_zoo, "tiny", [4])
    het = variants["hetconv_p4"]
    conv = next(m for m in het.modules() if isinstance(m, leanconv.HetConv2d))
    from leanconv.ops import Backend, get_backend, register_backend, unregister_backend

    reference = get_backend("reference")
    register_backend(Backend("wrong", "hetconv", reference.prepare, lambda *args: reference.run(*args) + 1))
    monkeypatch.setattr(conv, "backend", "wrong")
    try:
        rows = bench.bench_models(variants, input_shape=(2, 3, 8, 8), warmup=0, repeats=1, modes=("infer",),
                                  formats=("contiguous",))
    finally:
        unregister_backend("hetconv", "wrong")
    row = next(r for r in rows if r["model_variant"] == "hetconv_p4")
    assert row["gate"] == "FAIL" and "median_ms" not in row


def test_write_results_writes_all_files(tmp_path):
    stem = str(tmp_path / "out" / "machine-setting")
    rows = [{"a": 1, "b": 2.5}, {"a": 2, "b": None}]
    paths = bench.write_results(stem, header={"cpu": "x"}, config={"k": 1}, rows=rows, columns=["a", "b"], title="t")
    assert paths == [stem + ".json", stem + ".csv", stem + ".md"]
    payload = json.loads(open(stem + ".json").read())
    assert payload["rows"] == rows and payload["environment"] == {"cpu": "x"}
    assert open(stem + ".csv").read().splitlines() == ["a,b", "1,2.5", "2,"]
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".tmp-")]


def test_environment_header_names_machine_isa_torch_threads():
    info = bench.describe_environment()
    for key in ("cpu", "torch", "torch_threads", "load_average_1_5_15min", "date_utc", "cpu_capability",
                "hetconv_direct_isa"):
        assert key in info
    isa = info["cpu_capability"].lower()
    assert bench.machine_slug(info).endswith(f"-{isa}-{info['torch_threads']}t")
    assert bench.machine_slug({**info, "cpu": "AMD EPYC 9R14", "cpu_capability": "AVX2", "torch_threads": 4}) == \
        "amd-epyc-9r14-avx2-4t"


def test_cli_bench_tiny_grid_and_render(tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["bench", "layers", "--grid", "tiny", "--batch", "1", "--repeats", "1", "--warmup", "0",
                 "--modes", "infer", "--formats", "contiguous", "--out-dir", str(results)]) == 0
    (written,) = [line for line in capsys.readouterr().out.split() if line.endswith(".json")]
    assert os.path.dirname(written) == str(results) and json.load(open(written))["rows"]
    script = os.path.join(ROOT, "scripts", "render_perf_section.py")
    out = tmp_path / "performance.md"
    subprocess.run([sys.executable, script, "--results", str(results), "--out", str(out)], check=True)
    text = out.read_text()
    assert "HetConv" in text
    # The targets table is computed from the same files: the slowest auto layer is named.
    assert "every HetConv layer of grid tiny, batch 1, infer, both formats: auto vs nn.Conv2d" in text
    assert "slowest: M8-N8-6x6" in text
    assert f"| {torch.backends.cpu.get_cpu_capability()} | every HetConv layer" in text  # the ISA column


def test_cli_rejects_bad_mode(capsys):
    assert main(["bench", "layers", "--grid", "tiny", "--modes", "fly"]) == 2
    assert "--modes" in capsys.readouterr().err


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not built in")
def test_depthwise_small_benchmark_gates_and_writes(tmp_path):
    stem = str(tmp_path / "dw")
    subprocess.run([sys.executable, "benchmarks/depthwise_small.py", "--quick", "--out", stem], check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    with open(stem + ".json") as handle:
        rows = json.load(handle)["rows"]
    assert {r["format"] for r in rows} == {"contiguous", "channels_last"} and len(rows) == 6
    assert all(r["prepacked_by_rule"] for r in rows)  # the quick shapes are all below the threshold


@pytest.mark.skipif(not hetconv_direct.available(), reason="direct kernel unavailable")
def test_direct_internals_benchmark_gates_and_writes(tmp_path):
    stem = str(tmp_path / "internals")
    subprocess.run([sys.executable, "benchmarks/direct_internals.py", "--quick", "--out", stem], check=True,
                   capture_output=True)
    with open(stem + ".json") as handle:
        payload = json.load(handle)
    rows = payload["rows"]
    assert {r["what"] for r in rows} == {"lane_loads", "relayout"}
    assert all(r["isa"] == hetconv_direct.active_isa() for r in rows)
    assert payload["environment"]["hetconv_direct_isa"] == hetconv_direct.active_isa()
    assert all(r["lanes_cl_ms"] > 0 and r["passes_nchw_ms"] > 0 for r in rows if r["what"] == "lane_loads")


@pytest.mark.slow
def test_inference_paths_benchmark_gates_and_writes(tmp_path):
    """The whole-network paths benchmark: every variant passes its correctness gate (the
    script exits non-zero otherwise) and each installed runtime gets its column."""
    import importlib.util

    runtimes = [name for name in ("openvino", "onnxruntime") if importlib.util.find_spec(name)]
    if "onnxruntime" in runtimes and importlib.util.find_spec("onnxscript") is None:
        runtimes.remove("onnxruntime")
    stem = str(tmp_path / "paths")
    subprocess.run([sys.executable, "benchmarks/inference_paths.py", "--smoke", "--runtimes", ",".join(runtimes),
                    "--out", stem], check=True, capture_output=True)
    with open(stem + ".json") as handle:
        payload = json.load(handle)
    rows = payload["rows"]
    assert {(r["conv"], r["batch"]) for r in rows} == {(c, b) for c in ("standard", "hetconv:p=4") for b in (1, 4)}
    for row in rows:
        assert row["fused_ms"] > 0 and row["optimized_ms"] > 0
        assert all(row[f"{name}_ms"] > 0 for name in runtimes)
    assert set(payload["environment"]["runtime_versions"]) == set(runtimes)
