#!/usr/bin/env python
"""Convert jsonl / parquet data sets (embedded or referenced images) into webdataset .tar shards.

  make_shards.py INPUT [INPUT ...] --out DIR [--samples-per-shard 1000] [--image-root DIR]

Each row needs a question (question / problem / prompt / query, or --question-field), an answer, and optional
images ("images": list or "image": one; a path relative to --image-root or to the input file's folder, bytes,
base64 or a {"bytes", "path"} struct). A folder of images with a jsonl of questions is a jsonl whose image
fields name the files. Rows that cannot be used are rejected with a count; shards are written under a temporary
name and renamed when complete. Parquet input needs pyarrow. ShareGPT rows ("messages": a user turn with the
question, an assistant turn with the answer) are read too.

The published PAPO evaluation (the PAPO_eval data set on Hugging Face, one split per benchmark, parquet rows of
ShareGPT "messages" + "images") becomes shards with one call per benchmark, naming the data set as the paper
does so `megatron-papo evaluate --protocol papo-eval` prints the paper's table (General AVG, Vision AVG, Overall):

  pairs=(hiyouga_geometry3k:Geo3K AI4Math_MathVista:MathVista We_Math:We-Math AI4Math_MathVerse:MathVerse
         lscpku_LogicVista:LogicVista "BUAADreamer_clevr_count_70k:SuperClevr Counting" MMMU_MMMU_Pro:MMMU-Pro
         AI4Math_MathVerse_vision_dependent:MathVerse_V)
  for pair in "${pairs[@]}"; do
    split=${pair%%:*}; name=${pair#*:}
    make_shards.py PAPO_eval/data/${split}-*.parquet --dataset "$name" --out "data/papo_eval/${name// /_}"
  done
  # MMK12 (the validation set of the PAPO training data, PAPO_MMK12_test): --dataset MMK12
  megatron-papo evaluate --checkpoint CKPT --data 'data/papo_eval/*' --protocol papo-eval --out eval.json

(Split file names follow the Hugging Face parquet export; adjust the glob to the files you downloaded.)
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help=".jsonl or .parquet files")
    parser.add_argument("--out", required=True, help="output directory for the .tar shards")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per shard")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix")
    parser.add_argument("--image-root", help="folder that relative image paths start from (default: input's)")
    parser.add_argument("--question-field", help="field holding the question (default: first of question, "
                                                 "problem, prompt, query)")
    parser.add_argument("--answer-field", default="answer", help="field holding the answer")
    parser.add_argument("--dataset", help="data set name stored with every sample (default: input file stem)")
    parser.add_argument("--reward", default="math", help="reward function name stored with every sample")
    parser.add_argument("--keep-image-tags", action="store_true", help="keep <image> placeholders in questions")
    args = parser.parse_args(argv)

    from pathlib import Path

    from tqdm import tqdm

    from megatron_papo.data.shards import write_shards
    from megatron_papo.data.sources import RowOptions, iter_samples

    opts = RowOptions(image_root=Path(args.image_root) if args.image_root else None,
                      question_field=args.question_field, answer_field=args.answer_field, dataset=args.dataset,
                      reward=args.reward, strip_image_tags=not args.keep_image_tags)
    rejected: dict = {}
    try:
        with tqdm(desc="writing", unit="sample", file=sys.stderr) as bar:
            paths = write_shards(iter_samples(args.inputs, opts, rejected), args.out, args.prefix,
                                 args.samples_per_shard, progress=lambda n: bar.update(1))
            written = bar.n
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    examples = rejected.pop("_examples", [])
    for line in examples[:10]:
        print(f"rejected {line}", file=sys.stderr)
    total_rejected = sum(rejected.values())
    detail = ", ".join(f"{k}={n}" for k, n in sorted(rejected.items()))
    print(f"wrote {written} samples in {len(paths)} shards to {args.out}; rejected {total_rejected}"
          + (f" ({detail})" if detail else ""))
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
