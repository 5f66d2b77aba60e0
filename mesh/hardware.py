"""What this machine has: psutil for CPU, memory, load and battery; torch for GPUs and the compute score.

``measure_flops``, ``measure_bandwidth`` and ``measure_overhead`` are blocking torch work: callers run them
with ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import psutil

from mesh.wire import Battery, GpuInfo, Hardware

log = logging.getLogger(__name__)
_GB = 1024**3
#: Square fp32 matmuls of this size: big enough to reach steady-state BLAS speed, small enough that a
#: 0.3 s benchmark runs many iterations even on a slow laptop.
BENCH_MATRIX = 512
#: The bandwidth benchmark's matrix: fp32 rows x columns (128 MiB), far beyond any CPU cache, read once per
#: matrix-vector product, as decode reads each weight once per token.
BANDWIDTH_MATRIX = (8192, 4096)


def gpus() -> tuple[GpuInfo, ...]:
    import torch

    out = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            try:
                free, total = torch.cuda.mem_get_info(i)
                usage = 1.0 - free / total
            except RuntimeError:
                usage = 0.0
            out.append(GpuInfo(name=props.name, memory_gb=props.total_memory / _GB, usage=usage))
    return tuple(out)


def snapshot(gpu_list: tuple[GpuInfo, ...] = ()) -> Hardware:
    """Current numbers; cheap enough to call every heartbeat (GPU list measured once at start)."""
    vm = psutil.virtual_memory()
    cores = psutil.cpu_count(logical=True) or 1
    try:
        load = os.getloadavg()[0] / cores
    except OSError:
        load = psutil.cpu_percent(interval=None) / 100.0
    battery = None
    try:
        b = psutil.sensors_battery()
    except (AttributeError, NotImplementedError, OSError):
        b = None
    if b is not None:
        battery = Battery(level=float(b.percent), charging=bool(b.power_plugged))
    return Hardware(
        gpus=gpu_list,
        cpu_cores=cores,
        memory_gb=vm.total / _GB,
        memory_free_gb=vm.available / _GB,
        load=load,
        battery=battery,
    )


def bf16_features() -> tuple[str, ...]:
    """How this CPU does bf16, as gossiped features: ``bf16-hardware`` (x86 AVX512-BF16 or AMX, Arm's BF16
    extension: bf16 matmuls are fast) and ``compute-bf16`` (also torch's vectorized AVX2/AVX512 kernels:
    int8 and int4 weight kernels are fast with bf16 activations — measured here on AVX2, int8 x fp32 is 7x
    slower than int8 x bf16 on a 576x576 matmul, while bf16 x bf16 dense is slower than fp32)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.startswith(("flags", "Features")) for w in line.split(":", 1)[1].split()}
    except OSError:
        flags = set()
    if flags & {"avx512_bf16", "amx_bf16", "bf16"}:
        return ("bf16-hardware", "compute-bf16")
    import torch

    return ("compute-bf16",) if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else ()


def measure_flops(seconds: float) -> float:
    """FLOP/s of fp32 matmuls on the best local device (GPU if any), measured for ``seconds``."""
    import torch

    if seconds <= 0:
        return 0.0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(BENCH_MATRIX, BENCH_MATRIX, device=device)
    b = torch.randn(BENCH_MATRIX, BENCH_MATRIX, device=device)
    flops = 2 * BENCH_MATRIX**3 * _per_second(lambda: (a @ b).sum().item(), seconds)
    log.info("compute benchmark: %.2f GFLOP/s on %s (matmuls of %d^2)", flops / 1e9, device, BENCH_MATRIX)
    return flops


def _per_second(run: Any, seconds: float) -> float:
    """How many times a second ``run()`` completes, after one warm-up call, over at least ``seconds``."""
    run()  # warm-up: pages touched, kernels chosen (and lazy CUDA init)
    iters, start = 0, time.perf_counter()
    while True:
        run()
        iters += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return iters / elapsed


def measure_bandwidth(seconds: float) -> float:
    """Memory bandwidth in bytes/s as decode sees it: fp32 matrix-vector products over a matrix much larger
    than any cache (on the GPU if any), measured for ``seconds``; 0.0 (unknown) when ``seconds`` <= 0."""
    import torch

    if seconds <= 0:
        return 0.0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, cols = BANDWIDTH_MATRIX
    w = torch.randn(rows, cols, device=device)
    x = torch.randn(cols, device=device)
    bandwidth = w.numel() * w.element_size() * _per_second(lambda: (w @ x).sum().item(), seconds)
    log.info("memory bandwidth benchmark: %.1f GB/s on %s (matrix-vector products of %dx%d)", bandwidth / 1e9,
             device, rows, cols)
    return bandwidth


#: The overhead benchmark's block: a Llama decoder layer this small computes next to nothing, so its decode
#: step is what every layer pays whatever its size (kernel dispatch, Python, attention bookkeeping).
OVERHEAD_BLOCK = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
OVERHEAD_STEPS = 24


def measure_overhead(dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> dict[str, float]:
    """Per-token dispatch time of one transformer block, seconds, per compute dtype: the median decode step
    of a tiny Llama block (``OVERHEAD_BLOCK``) with a KV cache, on the CPU, with this process's threads."""
    import torch
    from transformers import DynamicCache, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(num_hidden_layers=1, **OVERHEAD_BLOCK)
    config._attn_implementation = "sdpa"
    out = {}
    with torch.no_grad():
        for name in dtypes:
            dtype = getattr(torch, name)
            block = LlamaDecoderLayer(config, 0).to(dtype).eval()
            rope = LlamaRotaryEmbedding(config)
            cache = DynamicCache(config=config)
            x = torch.randn(1, 1, config.hidden_size, dtype=dtype)
            times = []
            for i in range(OVERHEAD_STEPS):
                pos = torch.tensor([[i]])
                t0 = time.perf_counter()
                block(x, position_embeddings=rope(x, pos), cache=cache, position_ids=pos, use_cache=True)
                times.append(time.perf_counter() - t0)
            out[name] = sorted(times[4:])[len(times[4:]) // 2]  # the first steps warm up
    log.info("per-block overhead: %s", ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in out.items()))
    return out


#: The weight-kernel benchmark's matrix (rows x columns): 32 M weights, 16-128 MiB by format, beyond the caches.
KERNEL_MATRIX = (8192, 4096)
#: ... and a head's shape (a vocabulary of outputs over a narrow hidden size), measured as "<kernel>-wide":
#: the int8 kernel streams a 49152x576 head at half its 8192x4096 speed here.
WIDE_MATRIX = (32768, 1024)


def measure_kernels(seconds: float) -> dict[str, float]:
    """Bytes of weights per second each matrix-vector kernel a stage runs streams on the CPU, one batch-1 token
    at a time: "float32" (fp32 activations), "bfloat16", and the weight-only "int8" and "int4" kernels (bf16
    activations), each measured for ``seconds``. Decode reads every weight once per token, so a stage's
    weights over these is its time; compact kernels may be slower than memory (they unpack as they go)."""
    if seconds <= 0:
        return {}
    out = _kernels(*KERNEL_MATRIX, seconds)
    out |= {f"{k}-wide": v for k, v in _kernels(*WIDE_MATRIX, seconds, ("bfloat16", "int8", "int4")).items()}
    log.info("weight kernels: %s", ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in out.items()))
    return out


def _kernels(rows: int, cols: int, seconds: float, names: tuple[str, ...] = ("float32", "bfloat16", "int8", "int4")
             ) -> dict[str, float]:
    import torch

    # Constant weights (the kernels' speed does not depend on the values; random ones take longer to make).
    x32, x16 = torch.randn(1, cols), torch.randn(1, cols, dtype=torch.bfloat16)
    w32 = torch.full((rows, cols), 0.5) if "float32" in names else torch.empty(0, cols)
    w16 = torch.full((rows, cols), 0.5, dtype=torch.bfloat16)
    q8 = torch.full((rows, cols), 3, dtype=torch.int8)
    s8 = torch.full((rows,), 0.01, dtype=torch.bfloat16)
    q4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.full((rows, cols), 7, dtype=torch.int32), 1)
    sz4 = torch.full((cols // 32, rows, 2), 0.01, dtype=torch.bfloat16)
    kernels = {
        "float32": (lambda: x32 @ w32.t(), rows * cols * 4),
        "bfloat16": (lambda: x16 @ w16.t(), rows * cols * 2),
        "int8": (lambda: torch.ops.aten._weight_int8pack_mm(x16, q8, s8), rows * cols),
        "int4": (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x16, q4, 32, sz4), rows * cols // 2),
    }
    return {name: size * _per_second(run, seconds) for name, (run, size) in kernels.items() if name in names}
