"""Command line: `python -m lumina_core convert IN OUT --dtype bf16|fp8_e4m3fn|q8_0|...`, `python -m lumina_core demo`,
`python -m lumina_core generate --dit ... --text-encoder ... --vae ... --prompt ... --out DIR` (any family) and
`python -m lumina_core lora-convert SRC DST [--dit CHECKPOINT]`."""

from __future__ import annotations

import argparse
import logging
import sys
import time


def _convert(args) -> int:
    from .dtypes import dtype_from_name
    from .weights.convert import convert_checkpoint, convert_to_gguf
    from .weights.layouts import CheckpointError
    from .weights.tensor_io import is_gguf

    start = time.perf_counter()

    def progress(done, total):
        if done == total or done % 50 == 0:
            sys.stderr.write(f"\r{done}/{total} tensors")
            sys.stderr.flush()

    try:
        if is_gguf(args.output):
            config = convert_to_gguf(args.input, args.output, qtype=args.dtype, progress=progress)
        elif args.dtype in GGUF_ONLY:
            raise ValueError(f"--dtype {args.dtype} is a GGUF type: give an output file ending in .gguf")
        else:
            config = convert_checkpoint(args.input, args.output, dtype=dtype_from_name(args.dtype), progress=progress)
    except (CheckpointError, ValueError) as err:
        sys.stderr.write(f"\nerror: {err}\n")
        return 2
    sys.stderr.write("\n")
    sys.stdout.write(
        f"wrote {args.output} ({args.dtype}): DiT dim {config.dim}, {config.n_layers} layers, "
        f"{config.n_heads} heads, in {time.perf_counter() - start:.1f} s\n"
    )
    return 0


def _lora_convert(args) -> int:
    from .lora.convert import convert_lora_file
    from .lora.plan import LoraError
    from .weights.layouts import CheckpointError

    try:
        summary = convert_lora_file(args.src, args.dst, dit=args.dit)
    except (LoraError, CheckpointError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    kept = summary["text_encoder_keys"]
    sys.stdout.write(f"wrote {args.dst}: {summary['modules']} LoRA modules in original names"
                     + (f", {kept} text-encoder keys kept as they were" if kept else "") + "\n")
    dropped = summary["dropped"]
    if dropped:
        sys.stdout.write(f"left out {len(dropped)} keys:\n" + "".join(f"  {k}: {why}\n" for k, why in dropped.items()))
    return 0


# Types a .gguf output takes besides bf16/fp16/fp32 (city96's legacy quantizations).
GGUF_ONLY = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


def main(argv=None) -> int:
    from .dtypes import DTYPE_NAMES

    parser = argparse.ArgumentParser(prog="python -m lumina_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser(
        "convert",
        help="rewrite a DiT checkpoint (safetensors, .pth or .gguf) as a smaller safetensors or GGUF file",
        description="Streams tensor by tensor, so it needs little memory whatever the file size. An output ending in "
        ".gguf is written in ComfyUI-GGUF's conventions.",
    )
    conv.add_argument("input", help="e.g. consolidated.00-of-01.safetensors (the fp32 release)")
    conv.add_argument("output", help="e.g. ComfyUI/models/diffusion_models/lumina_t2i_5b_bf16.safetensors, or "
                      "lumina2-q8_0.gguf")
    conv.add_argument("--dtype", choices=DTYPE_NAMES + GGUF_ONLY, default="bf16",
                      help="fp8_e4m3fn/fp8_e5m2 store the linear weights in fp8 and the rest (0.3%%) in bf16; "
                      "q8_0/q5_1/q5_0/q4_1/q4_0 (a .gguf output only) quantize the matrices, keeping the embedders, "
                      "final layer, norms and Lumina 2's refiners unquantized")
    conv.set_defaults(func=_convert)

    lora = sub.add_parser(
        "lora-convert",
        help="rewrite a LoRA (PEFT/diffusers, kohya or original names) in the original names ComfyUI's LoraLoader reads",
        description="Keys become diffusion_model.<original module>.lora_down/lora_up/alpha; Lumina-Image-2.0's diffusers "
        "to_q/to_k/to_v become one LoRA on the fused qkv (the same update).",
    )
    lora.add_argument("src", help="the LoRA file (.safetensors)")
    lora.add_argument("dst", help="the converted file, e.g. ComfyUI/models/loras/my_lora_comfy.safetensors")
    lora.add_argument("--dit", default=None,
                      help="a checkpoint of the model (its shapes place a lone to_q/to_k/to_v; no weights are read)")
    lora.set_defaults(func=_lora_convert)

    from .demo import add_demo_parser

    add_demo_parser(sub)

    from .generate import add_generate_parser

    add_generate_parser(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
