"""Convert checkpoints between Hugging Face (DeepSeek-V2/V3, Llama, Qwen2) and ds_parallel run directories.

    python launchers/convert.py hf-to-ds --hf HF_DIR --out RUN_DIR [--dtype fp32|bf16]
    python launchers/convert.py ds-to-hf --ckpt RUN_OR_STEP_DIR --out HF_DIR [--dtype ...] [--max-shard-gb 5]

hf-to-ds writes RUN_DIR/checkpoints/step_0 (fp32 masters, zero AdamW moments) and
RUN_DIR/config.yaml, so `launchers/train.py --config RUN_DIR/config.yaml` resumes from it.
ds-to-hf writes config.json + model.safetensors (sharded with an index when large), which
transformers' DeepseekV2/V3ForCausalLM loads (MLA models), or Llama/Qwen2ForCausalLM (MHA/GQA:
qwen2 for a model with q/k/v biases). Both stream tensor by tensor, in one process.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    to_ds = sub.add_parser("hf-to-ds", help="HF checkpoint directory -> ds_parallel run directory")
    to_ds.add_argument("--hf", required=True, help="directory with config.json and *.safetensors")
    to_ds.add_argument("--out", required=True, help="run directory to write (train.out_dir)")
    to_ds.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype to load in (masters are fp32)")
    to_hf = sub.add_parser("ds-to-hf", help="ds_parallel checkpoint -> HF checkpoint directory")
    to_hf.add_argument("--ckpt", required=True, help="run directory (uses its latest) or checkpoints/step_<N>")
    to_hf.add_argument("--out", required=True, help="HF checkpoint directory to write")
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (router stays fp32)")
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="size above which files are split")
    args = parser.parse_args(argv)

    import torch

    from ds_parallel.checkpoint import load_model, save_model
    from ds_parallel.interop.hf import load_hf, save_hf
    from ds_parallel.parallel.init import report_failure

    try:
        if args.direction == "hf-to-ds":
            model = load_hf(args.hf, dtype=getattr(torch, DTYPES[args.dtype]))
            where = save_model(model, args.out)
        else:
            model = load_model(args.ckpt)
            dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
            save_hf(model, args.out, dtype=dtype, max_shard_bytes=int(args.max_shard_gb * 2**30))
            where = args.out
    except Exception as exc:  # one line for the user; the traceback above it for debugging
        return report_failure("convert", exc)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {where} ({n_params:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
