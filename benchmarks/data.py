"""Corpus preparation throughput: lmforge's token cache against Hugging Face datasets, same corpus, tokenizer, cores.

Both sides go from JSONL files to one flat token file (each document's tokens, then the end-of-text token), the
job of a pretraining run's data preparation:

- ``lmforge``: ``lmforge.data.cache.build_token_file`` with ``num_proc`` worker processes (streamed, written in
  document order, checksummed);
- ``hf-datasets``: ``datasets.load_dataset("json")`` (to Arrow), ``.map(batched=True, num_proc=N)`` with the same
  ``tokenizers`` tokenizer, then the ids written to a flat file as nanoGPT's ``prepare.py`` does.

Bar: lmforge at least as fast at each ``num_proc``. The two token files must be identical (checked). The corpus is
lmforge's embedded synthetic text (``--mb`` MB in 8 files, no download) or ``--files``. Writes ``data.csv`` and
``data.png`` to ``--out``.

    python benchmarks/data.py --mb 64 --num-proc 1,2,4,8
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import harness
import numpy as np


def write_corpus(folder: Path, megabytes: float, shards: int = 8, doc_bytes: int = 3000) -> list[Path]:
    """The embedded corpus cut at sentence ends into documents of about ``doc_bytes`` (a web page's size), as
    ``shards`` JSONL files of ``{"text": ...}`` records."""
    from lmforge.data.sources import embedded

    (text,) = embedded(size_bytes=int(megabytes * 1e6), seed=0).documents()
    files = [folder / f"corpus-{i:02d}.jsonl" for i in range(shards)]
    handles = [f.open("w") for f in files]
    start = i = 0
    while start < len(text):
        end = text.find(". ", start + doc_bytes)
        end = len(text) if end < 0 else end + 1
        handles[i % shards].write(json.dumps({"text": text[start:end].strip()}) + "\n")
        start, i = end, i + 1
    for h in handles:
        h.close()
    return files


def run_lmforge(files: list[Path], tokenizer_json: Path, work: Path, num_proc: int) -> Path:
    from lmforge.data.cache import build_token_file
    from lmforge.data.sources import files as file_corpus
    from lmforge.tokenizers import HFTokenizer

    tok = HFTokenizer.from_file(tokenizer_json.parent)
    return build_token_file(file_corpus([str(f) for f in files]), tok, work, progress=False, num_proc=num_proc).path


def run_hf(files: list[Path], tokenizer_json: Path, work: Path, num_proc: int) -> Path:
    import datasets
    from tokenizers import Tokenizer

    datasets.disable_progress_bars()
    tok = Tokenizer.from_file(str(tokenizer_json))
    eos = tok.token_to_id("<|endoftext|>")

    def encode(batch):
        return {"ids": [e.ids + [eos] for e in tok.encode_batch(batch["text"])]}

    ds = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train", cache_dir=str(work))
    ds = ds.map(encode, batched=True, num_proc=num_proc if num_proc > 1 else None, remove_columns=["text"])
    lengths = np.fromiter((len(x) for x in ds["ids"]), dtype=np.int64, count=len(ds))
    out = np.memmap(work / "tokens.bin", dtype=np.uint16, mode="w+", shape=(int(lengths.sum()),))
    offset = 0
    for batch in ds.iter(batch_size=1024):
        arr = np.concatenate([np.asarray(x, dtype=np.uint16) for x in batch["ids"]])
        out[offset : offset + arr.size] = arr
        offset += arr.size
    out.flush()
    return work / "tokens.bin"


def main() -> int:
    p = harness.bench_parser(__doc__, "a 1 MB corpus and num_proc 1,2 (a smoke run: no speed claim)")
    p.add_argument("--mb", type=float, default=64.0, help="size of the embedded corpus in MB (default 64)")
    p.add_argument("--files", nargs="+", type=Path, help="JSONL files with a text field instead of the embedded text")
    p.add_argument("--num-proc", type=harness.positive_ints, default=None, help="worker counts (default 1,2,4,...)")
    harness.add_out_arg(p)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    counts = args.num_proc or ([1, 2] if args.quick else sorted({1, *[n for n in (2, 4, 8, 16) if n <= cores]}))
    print(harness.environment_line("cpu") + f", {cores} CPU cores")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = args.files or write_corpus(root, 1.0 if args.quick else args.mb)
        size = sum(f.stat().st_size for f in files)
        from lmforge.data.sources import files as file_corpus
        from lmforge.tokenizers import HFTokenizer

        corpus = file_corpus([str(f) for f in files])
        sample = (d for i, d in zip(range(2000), corpus.documents()))
        HFTokenizer.train_bpe(sample, 4096, 2).save(root / "tok")
        rows = []
        for n in counts:
            times, outputs = {}, {}
            for name, fn in (("lmforge", run_lmforge), ("hf-datasets", run_hf)):
                work = root / f"{name}-{n}"
                work.mkdir()
                start = time.perf_counter()
                outputs[name] = fn(files, root / "tok" / "tokenizer.json", work, n)
                times[name] = time.perf_counter() - start
            same = outputs["lmforge"].read_bytes() == outputs["hf-datasets"].read_bytes()
            tokens = outputs["lmforge"].stat().st_size // 2
            for name, seconds in times.items():
                rows.append({"impl": name, "num_proc": n, "seconds": round(seconds, 3), "mb_per_s": size / seconds / 1e6,
                             "mtokens_per_s": tokens / seconds / 1e6, "vs_hf": times["hf-datasets"] / seconds,
                             "identical_tokens": same})  # fmt: skip
    headers = ["impl", "num_proc", "seconds", "MB/s", "Mtokens/s", "speed vs hf", "identical tokens"]
    harness.print_table(headers, [[r["impl"], r["num_proc"], f"{r['seconds']:.2f}", f"{r['mb_per_s']:.1f}",
                                   f"{r['mtokens_per_s']:.2f}", f"{r['vs_hf']:.2f}x", r["identical_tokens"]]
                                  for r in rows])  # fmt: skip
    print(f"corpus: {size / 1e6:.1f} MB in {len(files)} files, {tokens:,} tokens")
    if args.quick:
        print("--quick: a smoke run on a small corpus, where start-up dominates; measure with --mb 64 or more")
    args.out.mkdir(parents=True, exist_ok=True)
    written = harness.write_csv(args.out / "data.csv", rows)
    plotted = harness.plot_bars(args.out / "data.png", {f"{r['impl']}\nx{r['num_proc']}": r["mb_per_s"] for r in rows},
                                ylabel="MB/s", title=f"JSONL -> token file, {size / 1e6:.0f} MB, {cores} cores")  # fmt: skip
    print(f"wrote {written}" + (f" and {args.out / 'data.png'}" if plotted else ""))
    return 0 if all(r["identical_tokens"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
