"""Prepare training data: `python launchers/prepare_data.py --config configs/data/X.yaml [key=value ...]`.

Raw text (JSONL, parquet, plain text) -> deduplication (exact + MinHash LSH, global or per
dump) -> quality filters -> a trained (or given) byte-level BPE tokenizer -> Megatron indexed
shards with a manifest, as datatrove stages on local processes or Slurm
(ds_parallel/data/prep/pipeline.py). `--dry-run` prints the plan and runs nothing. Rerunning
resumes: finished tasks are skipped. Exit status: 0 done (or submitted), 2 bad config.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML with a data_prep section, e.g. configs/data/demo.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print the stages and outputs, run nothing")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data_prep.executor.workers=4")
    args = parser.parse_args(argv)

    from ds_parallel.config import ConfigError, load_config
    from ds_parallel.data.prep.pipeline import check_prep, run

    try:
        cfg = load_config(args.config, args.overrides)
        check_prep(cfg.data_prep)
    except (ConfigError, ValueError) as exc:
        print(f"prepare_data: error: {exc}", file=sys.stderr, flush=True)
        return 2
    manifest = run(cfg, dry_run=args.dry_run)
    if manifest is not None:
        removed = manifest.get("dedup", {}).get("removed", {})
        print(f"prepare_data: {manifest['documents']} documents, {manifest['tokens']} tokens "
              f"({manifest['dtype']}, vocabulary {manifest['vocab_size']}) in {cfg.data_prep.output}_text_document"
              + (f"; dedup removed {removed}" if removed else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
