"""Shared pieces of the Flag-DiT benchmarks (issue #7): model and text builders, the FLOP count of a forward,
the machine's own fp32 matmul rate, robust timing, and markdown tables.

Not a test module (no test_ prefix); imported by the bench_*.py scripts, which put the repository root on sys.path
before importing it.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from lumina_core.models.blocks import init_random_weights  # noqa: E402
from lumina_core.models.config import FlagDiTConfig  # noqa: E402
from lumina_core.models.flag_dit import FlagDiT  # noqa: E402

# The mid-size configuration of issue #7: the 5B architecture at a width that runs on a laptop CPU.
MID = FlagDiTConfig(dim=1024, n_layers=8, n_heads=16, cap_feat_dim=4096)
# Small but not tiny: per-forward time dominates Python overhead and timer noise.
SMALL = FlagDiTConfig(dim=512, n_layers=4, n_heads=8, cap_feat_dim=4096)
TEXT_LEN = 40


def build_model(cfg: FlagDiTConfig, seed: int = 0, dtype=torch.float32) -> FlagDiT:
    model = FlagDiT(cfg)
    init_random_weights(model, seed)
    return model.to(dtype).eval().requires_grad_(False)


def random_text(batch: int, length: int, dim: int, seed: int = 0, real: int | None = None):
    """Features [batch, length, dim] and a mask with `real` real tokens per row (default: all real)."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, length, dim, generator=gen)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, : length if real is None else real] = True
    return feats, mask


def seq_len(cfg: FlagDiTConfig, latent_h: int, latent_w: int) -> int:
    p = cfg.patch_size
    return (latent_h // p) * (latent_w // p + 1)


def forward_flops(
    cfg: FlagDiTConfig, batch: int, latent_h: int, latent_w: int, text_len: int, *, with_text: bool = True
) -> dict:
    """Multiply-add FLOPs (2 per MAC) of one forward, by part; elementwise work (norms, RoPE, softmax) is not counted.

    B batch, N = (h/p)*(w/p + 1) image tokens (eol included), P = (h/p)*(w/p) patches, T text tokens, d = dim,
    d_kv = n_kv_heads*head_dim, F = ffn_hidden_dim, C = cap_feat_dim, a = adaln_dim, o = p^2*out_channels, n layers:

        embed = 2*B*P*(p^2*in_channels)*d + 2*B*(256*a + a*a)                       x_embedder, t_embedder
        text  = 2*B*C*a + n * 2*(2*B*T*C*d_kv)                                      cap_embedder, wk_y/wv_y per layer
        layer = 2*B*a*6d                                                            adaLN
              + 2*B*N*(2*d*d + 2*d*d_kv)                                            wq, wo, wk, wv
              + 3 * 2*B*N*d*F                                                       w1, w3, w2
              + 2 * 2*B*N*N*d                                                       self-attention QK^T and AV
              + 2 * 2*B*N*T*d                                                       cross-attention QK^T and AV
        final = 2*B*a*2d + 2*B*N*d*o
        total = embed + text + n*layer + final       (with_text=False drops `text`: forward_with_text)
    """
    B, T, d, a, C = batch, text_len, cfg.dim, cfg.adaln_dim, cfg.cap_feat_dim
    p = cfg.patch_size
    N = seq_len(cfg, latent_h, latent_w)
    P = (latent_h // p) * (latent_w // p)
    d_kv = cfg.kv_heads * cfg.head_dim
    F = cfg.ffn_hidden_dim
    n = cfg.n_layers
    o = p * p * cfg.out_channels
    parts = {
        "embedders": 2 * B * P * (p * p * cfg.in_channels) * d + 2 * B * (256 * a + a * a),
        "text (cap_embedder, text K/V)": (2 * B * C * a + n * 2 * (2 * B * T * C * d_kv)) if with_text else 0,
        "adaLN": n * 2 * B * a * 6 * d + 2 * B * a * 2 * d,
        "attention projections": n * 2 * B * N * (2 * d * d + 2 * d * d_kv),
        "feed-forward": n * 3 * 2 * B * N * d * F,
        "self-attention QK^T, AV": n * 2 * 2 * B * N * N * d,
        "cross-attention QK^T, AV": n * 2 * 2 * B * N * T * d,
        "final layer": 2 * B * N * d * o,
    }
    parts["total"] = sum(parts.values())
    return parts


def matmul_rate(size: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    """Best FLOP/s of torch.mm on two size x size matrices: the peak this machine delivers to dense fp32 GEMMs."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up (thread pool, MKL/oneDNN kernel selection)
    best = math.inf
    for _ in range(repeats):
        best = min(best, timed(lambda: torch.mm(a, b)))
    return 2 * size**3 / best


# The clock of `timed`: wall time (what a user waits) or this process's CPU time (user + system, all threads), which
# a busy shared machine disturbs far less. With one thread, CPU time equals wall time on an idle machine.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def add_timing_args(parser) -> None:
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or process CPU time (robust on a shared machine; implies --threads 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")


def apply_timing_args(args) -> str:
    """Set the clock and thread count from add_timing_args' options; returns a line describing them."""
    global _clock
    _clock = CLOCKS[args.clock]
    threads = args.threads or (1 if args.clock == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    return f"{machine_line()}, clock: {args.clock}"


def now() -> float:
    """The current reading of the chosen clock."""
    return _clock()


def timed(fn: Callable[[], object]) -> float:
    start = _clock()
    fn()
    return _clock() - start


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Run each function `warmup` times, then `repeats` rounds in which every function runs once (alternating, so
    that load changes on a shared machine hit all of them alike); returns the list of times per function."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for r in range(repeats):
        # Alternate the order each round, so no function always runs right after the same neighbour.
        order = list(fns) if r % 2 == 0 else list(reversed(list(fns)))
        for name in order:
            gc.collect()
            times[name].append(timed(fns[name]))
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """Median with the relative half-range of the repeats, e.g. '1.234 s (+-3%)'."""
    m = median(xs)
    half = (max(xs) - min(xs)) / 2 / m * 100 if m > 0 else 0.0
    return f"{m:.3f} s (+-{half:.0f}%)"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def gflop(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def machine_line() -> str:
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"mkldnn {'on' if torch.backends.mkldnn.is_available() else 'off'}"
    )
