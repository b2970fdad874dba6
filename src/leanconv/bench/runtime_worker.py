"""Time ONNX graphs in one deployment runtime, in a process of its own.

Run as a script (``python runtime_worker.py job.json result.json``) by
:mod:`leanconv.bench.runtimes`, never imported by leanconv: it imports neither torch
nor leanconv, so the runtime's own threads share the CPU with nothing else (two
runtimes in one process slow each other several-fold).

The job file names the runtime (``"openvino"`` or ``"onnxruntime"``), the thread count,
``warmup``, ``repeats``, ``block_seconds`` and the jobs: ``{"key", "onnx", "input",
"output"}`` (``input``/``output``: ``.npy`` paths). For each job the worker loads the
graph (f32, latency-oriented settings), writes its output on ``input`` for the caller's
correctness gate, then times all jobs in rounds: every round runs a block of
consecutive calls of each job (at least ``block_seconds``); a sample is a block's mean.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _load_openvino(path: str, threads: int):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(path, "CPU", {
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
    })
    request = compiled.create_infer_request()
    output = compiled.outputs[0]

    def run(x):
        return request.infer({0: x})[output]

    return run, ov.__version__


def _load_onnxruntime(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x):
        return session.run(None, {name: x})[0]

    return run, ort.__version__


LOADERS = {"openvino": _load_openvino, "onnxruntime": _load_onnxruntime}


def main(job_path: str, result_path: str) -> int:
    import numpy as np

    with open(job_path) as handle:
        job = json.load(handle)
    load = LOADERS[job["runtime"]]
    runs, inputs, inner, load_s, version = {}, {}, {}, {}, None
    for item in job["jobs"]:
        started = time.perf_counter()
        run, version = load(item["onnx"], int(job["threads"]))
        x = np.load(item["input"])
        out = run(x)
        load_s[item["key"]] = time.perf_counter() - started
        np.save(item["output"], np.asarray(out))
        for _ in range(int(job["warmup"])):
            run(x)
        started = time.perf_counter()
        run(x)
        inner[item["key"]] = max(1, round(float(job["block_seconds"]) / max(time.perf_counter() - started, 1e-6)))
        runs[item["key"]], inputs[item["key"]] = run, x
    samples = {key: [] for key in runs}
    for _ in range(int(job["repeats"])):
        for key, run in runs.items():
            x, count = inputs[key], inner[key]
            started = time.perf_counter()
            for _ in range(count):
                run(x)
            samples[key].append((time.perf_counter() - started) / count)
    result = {"runtime": job["runtime"], "version": version, "samples": samples, "inner": inner, "load_s": load_s}
    temporary = f"{result_path}.tmp{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump(result, handle)
    os.replace(temporary, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
