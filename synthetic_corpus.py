"""Deterministic English-like documents for tests and the CPU pipeline (no downloads needed).

Words follow a sparse first-order Markov chain over a Zipf-weighted vocabulary, so a language
model can beat the unigram entropy; sentences start with a capital, some words are names
(Titlecase), acronyms (ALLCAPS) or mixed case (McDonald), so the CaseOps transform is exercised.
"""
from __future__ import annotations

import argparse
import json
import random

_SYLLABLES = ["ka", "lo", "mi", "ne", "ra", "to", "su", "vi", "de", "pa", "ri", "mo", "ta", "el", "an",
              "or", "is", "un", "be", "co", "th", "ing", "er", "st", "qu", "ch", "ou", "ea"]


def _vocabulary(rng: random.Random, n: int) -> list[str]:
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((1, 1, 2, 2, 2, 3)))))
    return sorted(words)


def generate_documents(n_docs: int, seed: int = 0, vocab: int = 400, mean_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    words = _vocabulary(random.Random(1234), vocab)  # the language is fixed; only sampling varies
    grammar = random.Random(99)
    zipf = [1.0 / (i + 1) for i in range(vocab)]
    successors = [grammar.choices(range(vocab), weights=zipf, k=6) for _ in range(vocab)]
    names = [w.title() for w in grammar.sample(words, 25)]
    acronyms = [w.upper() for w in grammar.sample(words, 8) if len(w) >= 2]
    docs = []
    for _ in range(n_docs):
        n_words = max(8, int(rng.expovariate(1 / mean_words)))
        cur, out, start = rng.randrange(vocab), [], True
        for i in range(n_words):
            r = rng.random()
            if r < 0.04:
                w = rng.choice(names)
            elif r < 0.05:
                w = rng.choice(acronyms)
            elif r < 0.055:
                w = "Mc" + words[cur].title()
            elif r < 0.06:
                w = str(rng.randrange(1, 2030))
            else:
                cur = rng.choice(successors[cur])
                w = words[cur]
            if start:
                w = w[:1].upper() + w[1:]
                start = False
            out.append(w)
            if rng.random() < 0.08 or i == n_words - 1:
                out[-1] += rng.choice(".....!?")
                start = True
            elif rng.random() < 0.05:
                out[-1] += ","
        docs.append(" ".join(out))
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="jsonl output with a 'text' field per line")
    a = ap.parse_args()
    with open(a.out, "w", encoding="utf-8") as fh:
        for d in generate_documents(a.docs, a.seed):
            fh.write(json.dumps({"text": d}) + "\n")


if __name__ == "__main__":
    main()
