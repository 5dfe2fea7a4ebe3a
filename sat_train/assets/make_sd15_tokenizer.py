"""Writes sat_train/assets/sd15/tokenizer/merges.txt.gz, SD v1.5's CLIP BPE merges (run once by a
maintainer; never at training time).

    pip download open_clip_torch==3.3.0 --no-deps && unzip -j open_clip_torch-*.whl \
        open_clip/bpe_simple_vocab_16e6.txt.gz
    python sat_train/assets/make_sd15_tokenizer.py bpe_simple_vocab_16e6.txt.gz

Source: OpenAI CLIP's byte-level BPE file (MIT licence), as shipped in the open_clip_torch wheel
(sha256 924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a). CLIP, and so SD v1.5's
tokenizer (openai/clip-vit-large-patch14), uses only its first 48894 merges: OpenAI's
SimpleTokenizer reads lines[1 : 49152 - 256 - 2 + 1]. The vocabulary follows from them
(sat_train.models.single_file.bundled_tokenizer), so only the used merges are kept, behind the usual
"#version: 0.2" line of a merges.txt.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

OUT = Path(__file__).with_name("sd15") / "tokenizer" / "merges.txt.gz"
USED_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 49408 = 256 bytes x 2 (+ "</w>") + merges + 2 specials


def main(source: str) -> None:
    lines = gzip.open(source, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : USED_MERGES + 1]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same input always gives the same bytes
    with gzip.GzipFile(OUT, "wb", mtime=0) as out:
        out.write(("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"))


if __name__ == "__main__":
    main(sys.argv[1])
