"""Peak resident memory and seconds per step of the whole Lumina-T2I pipeline from GGUF files, against bf16 and fp8.

Writes random weights in the released shapes into a temporary folder:

- a LLaMA-2-7B GGUF shaped as llama.cpp's Q4_K_M (`llama_tensor_get_type` for LLAMA_FTYPE_MOSTLY_Q4_K_M: every
  matrix Q4_K except `output.weight` and, in the layers `use_more_bits` picks (the first and last eighth and every
  third in between: 16 of 32), `attn_v` and `ffn_down`, which are Q6_K; norms F32; 4.08 GB like the published
  file), with llama.cpp's metadata and a 32,000-piece SentencePiece vocabulary, no tokenizer files (the tokenizer is
  rebuilt from the metadata). The `gguf` package has no K-quant quantizers, so the blocks are written directly:
  random bytes with small finite fp16 scales (`tests/helpers_gguf.random_blocks`), valid blocks whose weights have
  about the spread of trained ones;
- the 5B Flag-DiT as a bf16 safetensors file (10.1 GB) and, from it, a Q8_0 GGUF written by the pack's converter
  (`python -m lumina_core convert ... --dtype q8_0`, 5.38 GB);
- a LLaMA-2-7B-shaped Hugging Face folder in bf16 (13.5 GB, `bench_llama_load`) for the bf16 and fp8 runs.

Then each configuration runs in a fresh process (the whole pipeline as `python -m lumina_core demo` runs it: load the
text encoder, encode the prompt and the empty negative, free the encoder, load the DiT, sample with cfg at 512x512):
bf16 DiT + bf16 encoder, fp8 DiT + fp8 encoder, Q8_0 DiT + Q4_K_M encoder (computed in bf16, or fp32 on a CPU without
bf16, as fp8 storage computes), and the encodings of that run saved and sampled with the Q8_0 DiT in a process that
loads no text encoder (the GGUF two-stage workflow's stage 2); both GGUF runs again with the negative prompt evaluated
apart from the positive (`sample(batch_cfg=False)`, the demo's `--unbatched-cfg`: half the activations at a time, the
weights dequantized twice per step). Neither GGUF process imports transformers (the LLaMA GGUF runs in
`lumina_core.text.llama_decoder`, its tokenizer rebuilt from the metadata); each reports whether it did. Peak RSS is
each child's own high-water mark (VmHWM); seconds per step are the sampling steps' mean, and the ratios are taken
within this one run. Target: the GGUF pipeline below 6 GB. The folder is deleted at the end. Needs ~34 GB of disk and
~14 GB of memory (the bf16 run); `--size small` checks the script in a few minutes, `--only-gguf` skips the bf16 and
fp8 runs (and their files).

    python tests/bench/bench_gguf_pipeline.py [--size full|small] [--dir DIR] [--steps 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_llama_load import FULL as LLAMA_FULL  # noqa: E402
from bench_llama_load import write_checkpoint as write_llama_folder  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

from lumina_core import FLAG_DIT_5B, FlagDiT, FlagDiTConfig  # noqa: E402
from lumina_core.weights.gguf_quants import tensor_bytes  # noqa: E402
from lumina_core.weights.tensor_io import write_safetensors  # noqa: E402
from tests.helpers_gguf import random_blocks  # noqa: E402

GB = 1e9
TARGET_GB = 6.0
UNBATCHED = "negative apart (--unbatched-cfg)"
SMALL_DIT = FlagDiTConfig(dim=512, n_layers=4, n_heads=8, cap_feat_dim=1024)
SMALL_LLAMA = dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, intermediate_size=2816,
                   vocab_size=32000)
PROMPT = "a fluffy mouse holding a watermelon, in a magical and colorful setting"

CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, sys.argv[1])
cfg = json.loads(sys.argv[2])
from lumina_core import load_dit, load_text_encoder, make_noise, release_memory, sample
from lumina_core.dtypes import dtype_from_name

def status(field):  # VmHWM: this process's own peak (a new one from exec), VmRSS: now; GB
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024 / 1e9

out = {"stages": {}, "peak_after": {}}
def stage(name, start):
    out["stages"][name] = time.perf_counter() - start
    out["peak_after"][name] = status("VmHWM")

if cfg["text_encoder"] is None:  # saved encodings: transformers is never imported
    from lumina_core import conditioning
    start = time.perf_counter()
    cond, uncond = ((s.features, s.mask) for s in (conditioning.load(p) for p in cfg["saved"]))
    stage("load saved encodings", start)
else:
    start = time.perf_counter()
    encoder = load_text_encoder(cfg["text_encoder"], dtype=dtype_from_name(cfg["text_dtype"]))
    stage("load text encoder", start)
    start = time.perf_counter()
    cond = encoder.encode([cfg["prompt"]])
    uncond = encoder.encode([""])
    stage("encode", start)
    del encoder
    release_memory()  # as `python -m lumina_core demo` frees it
    out["resident_after_freeing_the_encoder"] = status("VmRSS")
    if cfg.get("save"):
        from lumina_core import conditioning
        for path, (features, mask) in zip(cfg["save"], (cond, uncond)):
            conditioning.save(path, features, mask, family="lumina_t2i")
start = time.perf_counter()
dit = load_dit(cfg["dit"], dtype=dtype_from_name(cfg["dit_dtype"]))
stage("load DiT", start)
noise = make_noise(0, (1, 4, cfg["size"] // 8, cfg["size"] // 8))
marks = [time.perf_counter()]
start = marks[0]
latent = sample(dit, noise, cond, uncond, steps=cfg["steps"], cfg=4.0, shift=4.0, solver="euler",
                batch_cfg=cfg["batch_cfg"], callback=lambda info: marks.append(time.perf_counter()))
stage("sample", start)
out["step_seconds"] = [b - a for a, b in zip(marks, marks[1:])]
out["finite"] = bool(latent.isfinite().all())
out["peak"] = status("VmHWM")
out["transformers_imported"] = "transformers" in sys.modules
print(json.dumps(out))
"""

IMPORT_ONLY = r"""
import json, sys, torch
if sys.argv[1] == "transformers":
    import transformers, transformers.models.llama.modeling_llama
with open("/proc/self/status") as f:
    print(json.dumps({"peak": next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) * 1024 / 1e9}))
"""


def run_child(argv: list[str]) -> tuple[str, float]:
    """Run a process; returns (stdout, the kernel's ru_maxrss of it in GB). Raises on failure.

    ru_maxrss counts the parent's resident memory at the fork too (Linux carries the forked copy's high-water mark
    across exec), so the children report their own peak, VmHWM, which starts anew at exec."""
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=REPO, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if code != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed ({code}):\n{stderr[-3000:]}\n{stdout[-2000:]}")
    return stdout, usage.ru_maxrss * 1024 / GB


# --------------------------------------------------------------------------------------------------------------
# The files


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's llama-quant.cpp `use_more_bits`."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def llama_q4_k_m_tensors(shape: dict) -> dict:
    """{llama.cpp name: (torch-order shape, type)} of a Q4_K_M LLaMA, in llama.cpp's file order."""
    h, f, v, n = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    kv = h * shape.get("num_key_value_heads", shape["num_attention_heads"]) // shape["num_attention_heads"]
    infos = {"token_embd.weight": ((v, h), Q.Q4_K)}
    for i in range(n):
        more = Q.Q6_K if use_more_bits(i, n) else Q.Q4_K
        infos.update({
            f"blk.{i}.attn_norm.weight": ((h,), Q.F32),
            f"blk.{i}.ffn_down.weight": ((h, f), more),
            f"blk.{i}.ffn_gate.weight": ((f, h), Q.Q4_K),
            f"blk.{i}.ffn_up.weight": ((f, h), Q.Q4_K),
            f"blk.{i}.ffn_norm.weight": ((h,), Q.F32),
            f"blk.{i}.attn_k.weight": ((kv, h), Q.Q4_K),
            f"blk.{i}.attn_output.weight": ((h, h), Q.Q4_K),
            f"blk.{i}.attn_q.weight": ((h, h), Q.Q4_K),
            f"blk.{i}.attn_v.weight": ((kv, h), more),
        })
    infos["output_norm.weight"] = ((h,), Q.F32)
    infos["output.weight"] = ((v, h), Q.Q6_K)
    return infos


def spm_vocabulary(size: int) -> list[tuple[str, float, int]]:
    """(piece, score, type) of a LLaMA-like SentencePiece vocabulary: <unk> <s> </s>, the 256 byte pieces, then
    pieces of one, two, three characters (with and without the leading "▁") by falling score."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()"
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(f"<0x{i:02X}>", 0.0, 6) for i in range(256)]
    words = ["▁"] + list(alphabet)
    words += ["▁" + a for a in alphabet] + [a + b for a in alphabet[:52] for b in alphabet[:26]]
    words += ["▁" + a + b for a in alphabet[:52] for b in alphabet[:26]]
    words += [a + b + c for a in alphabet[:26] for b in alphabet[:26] for c in alphabet[:26]]
    for i, word in enumerate(words[: size - len(pieces)]):
        pieces.append((word, -float(i), 1))
    return pieces


def write_llama_gguf(path: Path, shape: dict) -> int:
    """The Q4_K_M-shaped LLaMA GGUF (module docstring), written tensor by tensor; returns its tensor bytes."""
    import gguf

    infos = llama_q4_k_m_tensors(shape)
    h, heads, n = shape["hidden_size"], shape["num_attention_heads"], shape["num_hidden_layers"]
    writer = gguf.GGUFWriter(None, "llama")
    writer.add_name("LLaMA v2 (random weights)")
    writer.add_context_length(4096)
    writer.add_embedding_length(h)
    writer.add_block_count(n)
    writer.add_feed_forward_length(shape["intermediate_size"])
    writer.add_rope_dimension_count(h // heads)
    writer.add_head_count(heads)
    writer.add_head_count_kv(shape.get("num_key_value_heads", heads))
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    pieces = spm_vocabulary(shape["vocab_size"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p for p, _, _ in pieces])
    writer.add_token_scores([s for _, s, _ in pieces])
    writer.add_token_types([t for _, _, t in pieces])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, (tshape, qtype) in infos.items():
        writer.add_tensor_info(name, tshape, np.dtype(np.float32), tensor_bytes(qtype, tshape), raw_dtype=qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, (tshape, qtype) in infos.items():
        if qtype == Q.F32:
            data = (1.0 + 0.1 * rng.standard_normal(tshape)).astype(np.float32)
        else:
            data = random_blocks(qtype, tshape[0], tshape[1], rng)
        writer.write_tensor_data(data)
    writer.close()
    return sum(tensor_bytes(t, s) for s, t in infos.values())


def write_bf16_dit(config: FlagDiTConfig, path: Path) -> None:
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), torch.bfloat16) for k, v in FlagDiT(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tensors = ((k, (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)) for k, (s, _) in shapes.items())
    write_safetensors(path, tensors, shapes=shapes, metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("full", "small"), default="full")
    parser.add_argument("--dir", default=None, help="where to write the temporary models (full size: 34 GB free)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--only-gguf", action="store_true", help="the GGUF pipeline only (no bf16/fp8 files)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    full = args.size == "full"
    dit_config, llama_shape = (FLAG_DIT_5B, LLAMA_FULL) if full else (SMALL_DIT, SMALL_LLAMA)
    from lumina_core.dtypes import compute_dtype_for

    compute = "bf16" if compute_dtype_for(torch.device("cpu")) == torch.bfloat16 else "fp32"

    folder = Path(tempfile.mkdtemp(prefix="lumina_gguf_", dir=args.dir))
    results = []
    try:
        start = time.perf_counter()
        llama_gguf = folder / "llama-2-7b.Q4_K_M.gguf"
        llama_bytes = write_llama_gguf(llama_gguf, llama_shape)
        dit_bf16 = folder / "lumina_t2i_5b_bf16.safetensors"
        write_bf16_dit(dit_config, dit_bf16)
        dit_gguf = folder / "lumina_t2i_5b_q8_0.gguf"
        subprocess.run([sys.executable, "-m", "lumina_core", "convert", str(dit_bf16), str(dit_gguf), "--dtype",
                        "q8_0"], cwd=REPO, check=True, capture_output=True)
        saved = [str(folder / "cond.safetensors"), str(folder / "negative_cond.safetensors")]
        configs = [("Q8_0 DiT + Q4_K_M encoder", llama_gguf, compute, dit_gguf, compute),
                   ("saved encodings + Q8_0 DiT", None, None, dit_gguf, compute),
                   (f"Q8_0 DiT + Q4_K_M encoder, {UNBATCHED}", llama_gguf, compute, dit_gguf, compute),
                   (f"saved encodings + Q8_0 DiT, {UNBATCHED}", None, None, dit_gguf, compute)]
        if args.only_gguf:
            dit_bf16.unlink()
        else:
            llama_dir = folder / "Llama-2-7b-hf"
            llama_dir.mkdir()
            write_llama_folder(str(llama_dir), llama_shape, int(10e9))
            configs = [("bf16 DiT + bf16 encoder", llama_dir, "bf16", dit_bf16, "bf16"),
                       ("fp8 DiT + fp8 encoder", llama_dir, "fp8_e4m3fn", dit_bf16, "fp8_e4m3fn")] + configs
        sys.stdout.write(f"wrote the random models in {time.perf_counter() - start:.0f} s: LLaMA Q4_K_M "
                         f"{llama_gguf.stat().st_size / GB:.2f} GB ({llama_bytes / GB:.2f} GB of tensors), DiT Q8_0 "
                         f"{dit_gguf.stat().st_size / GB:.2f} GB\n")
        sys.stdout.flush()

        for what in ("torch", "transformers"):
            stdout, _ = run_child([sys.executable, "-c", IMPORT_ONLY, what])
            results.append({"name": "import torch only" if what == "torch" else "import torch + transformers only",
                            "peak_gb": json.loads(stdout.strip().splitlines()[-1])["peak"]})
        for name, te, te_dtype, dit, dit_dtype in configs:
            batch_cfg = not name.endswith(UNBATCHED)
            cfg = {"text_encoder": te and str(te), "text_dtype": te_dtype, "dit": str(dit), "dit_dtype": dit_dtype,
                   "prompt": PROMPT, "size": args.width, "steps": args.steps, "batch_cfg": batch_cfg,
                   "save": saved if te == llama_gguf and batch_cfg else None, "saved": saved}
            stdout, maxrss = run_child([sys.executable, "-c", CHILD, str(REPO), json.dumps(cfg)])
            info = json.loads(stdout.strip().splitlines()[-1])
            peak = info["peak"]
            info.update(name=name, peak_gb=peak, ru_maxrss_gb=maxrss,
                        step=sum(info["step_seconds"]) / len(info["step_seconds"]))
            results.append(info)
            sys.stdout.write(f"{name}: peak {peak:.2f} GB, {info['step']:.1f} s/step, finite {info['finite']}, "
                             f"transformers imported {info['transformers_imported']}\n")
            sys.stdout.flush()
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    steps = {r["name"]: r["step"] for r in results if "step" in r}
    sys.stdout.write(f"\nsize {args.size}: {args.width}x{args.width}, {args.steps} Euler steps with cfg, "
                     f"torch {torch.__version__}, {torch.get_num_threads()} threads, compute {compute}; "
                     f"GB = 1e9 bytes\n\n")
    rows = ["| configuration | peak RSS (GB) | s/step | vs bf16 | vs fp8 | stages (s) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        step = r.get("step")
        ratios = [f"{step / steps[k]:.2f}" if step and k in steps else ""
                  for k in ("bf16 DiT + bf16 encoder", "fp8 DiT + fp8 encoder")]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r.get("stages", {}).items())
        verdict = ""
        if "Q8_0" in r["name"] and full:
            verdict = f" ({'<' if r['peak_gb'] < TARGET_GB else 'OVER'} {TARGET_GB:g})"
        rows.append(f"| {r['name']} | {r['peak_gb']:.2f}{verdict} | {'' if step is None else f'{step:.1f}'} | "
                    f"{ratios[0]} | {ratios[1]} | {stages} |")
    sys.stdout.write("\n".join(rows) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "results": results}, indent=2))
    # Exit status: every full GGUF pipeline (negative batched or apart) below the target, and finite.
    pipelines = [r for r in results if r["name"].startswith("Q8_0")]
    return 0 if not full or all(r["peak_gb"] < TARGET_GB and r["finite"] for r in pipelines) else 1


if __name__ == "__main__":
    sys.exit(main())
