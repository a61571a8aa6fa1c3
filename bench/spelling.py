"""Where letter counting's chains go wrong: greedy chains read against their strings, token by token.

    python -m bench.spelling bench/results/rl_recipe-<machine>-default-d3-sftbalanced150*.json

A `cot` chain spells the string one letter a step, and the prompt shows the string as the
tokenizer cuts it: copying "quickhearted" out of its tokens means knowing which letters each
token holds. For the start and every arm of bench.rl_recipe result files this reads each
greedy chain's spelling (`chain_spelling`) against its string:

- chains spelt exactly, and the mean closeness of spelling to string (difflib's ratio), with
  how many exact answers there are beside them;
- each token of the strings spelt right or not (every one of its letters in a matching block
  of the alignment), split by the token's length and by how often it occurs in the words of
  the SFT training set (the config's tiers, train split): whether misspellings are a matter
  of long tokens, and of tokens the demonstrations never showed.

Nothing is decoded again: the result files keep every greedy completion. The figures go to
bench/results/spelling-<first file's name>.json.
"""
from __future__ import annotations

import argparse
import collections
import difflib
import functools
import json
import sys
from pathlib import Path

from bench.common import RESULTS, write_result
from picorl import data
from picorl.config import ConfigError, load_config
from picorl.envs import env_of
from picorl.envs.letter_counting import chain_closeness, chain_spelling, string_tokens
from picorl.models import load_tokenizer, resolve_model

# token length buckets: 1, 2, 3, 4, 5 or more letters
LONGEST = 5


def spelt_letters(string: str, spelled: str) -> list[bool]:
    """For each letter of `string`, whether the spelling's alignment to it (difflib's matching
    blocks) covers it. Worked example: "moon" spelt "mon" -> [True, True, False, True] (the
    longest common run "mo" and then "n"; the second o is the one left out)."""
    covered = [False] * len(string)
    for block in difflib.SequenceMatcher(None, string, spelled, autojunk=False).get_matching_blocks():
        covered[block.a:block.a + block.size] = [True] * block.size
    return covered


def token_spelling(pieces: list[str], string: str, spelled: str) -> list[tuple[str, bool]] | None:
    """Each token of `string` (`pieces`, as string_tokens cuts it) with whether all its letters
    were spelt; None when the pieces do not join back to the string (a tokenizer that adds
    marks), since the letters could not be assigned to tokens."""
    if "".join(pieces) != string:
        return None
    covered, out, at = spelt_letters(string, spelled), [], 0
    for piece in pieces:
        out.append((piece, all(covered[at:at + len(piece)])))
        at += len(piece)
    return out


def exposure_bucket(times: int) -> str:
    return "unseen" if times == 0 else "seen 1-2" if times <= 2 else "seen 3+"


def spelling_figures(items: list[dict], tokens_of, seen: dict) -> dict:
    """Spelling of greedy `items` (string, completion, exact): chains spelt exactly, mean
    closeness, exact answers, and tokens spelt right by length and by exposure."""
    spelt = closeness = exact = skipped = 0
    by_length = collections.defaultdict(lambda: [0, 0])
    by_exposure = collections.defaultdict(lambda: [0, 0])
    for item in items:
        spelled = chain_spelling(item["completion"]) or ""
        spelt += spelled == item["string"]
        closeness += chain_closeness(item["completion"], item["string"])
        exact += bool(item["exact"])
        tokens = token_spelling(tokens_of(item["string"]), item["string"], spelled)
        if tokens is None:
            skipped += 1
            continue
        for piece, right in tokens:
            for table, key in ((by_length, str(min(len(piece), LONGEST))),
                               (by_exposure, f"{exposure_bucket(seen.get(piece, 0))}, {min(len(piece), LONGEST)}")):
                table[key][0] += right
                table[key][1] += 1
    n = len(items)

    def rows(table):
        return {k: {"right": r, "n": t, "share": round(r / t, 4)} for k, (r, t) in sorted(table.items())}
    return {"n": n, "spelt_exactly": spelt, "closeness": round(closeness / max(n, 1), 4), "exact": exact,
            "tokens_by_length": rows(by_length), "tokens_by_exposure": rows(by_exposure),
            "items_not_cut": skipped}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="bench.rl_recipe result files")
    ap.add_argument("--results-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    runs = []
    for path in args.results:
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: {path}: not a readable result file ({e})", file=sys.stderr)
            return 2
    try:
        cfg = load_config(runs[0]["config"]["config"], runs[0]["config"]["sets"])
    except (ConfigError, KeyError) as e:
        print(f"error: {args.results[0]}: no usable config ({e})", file=sys.stderr)
        return 2
    tok = load_tokenizer(resolve_model(cfg.model.name))
    env = env_of(cfg)
    tokens_of = functools.cache(lambda string: string_tokens(tok, string))  # a string is cut once

    train_words = {r["string"] for d in cfg.sft.difficulties
                   for r in data.train_records(d, cfg.data.train_size, seed=cfg.data.seed, env=env)}
    seen = collections.Counter(piece for w in train_words for piece in tokens_of(w))
    out = {"files": [p.name for p in args.results], "sft_words": len(train_words), "runs": {}}
    for path, run in zip(args.results, runs):
        measured = {"start": run["start"]["items"], **{a: r["end"]["items"] for a, r in run["rows"].items()}}
        out["runs"][path.name] = figures = {name: spelling_figures(items, tokens_of, seen)
                                            for name, items in measured.items()}
        print(path.name)
        for name, f in figures.items():
            lengths = ", ".join(f"{k}: {v['share']:.0%}" for k, v in f["tokens_by_length"].items())
            print(f"  {name}: exact {f['exact']}/{f['n']}, spelt exactly {f['spelt_exactly']}, closeness "
                  f"{f['closeness']:.3f}; tokens right by length {lengths}")
    start = next(iter(out["runs"].values()))["start"]["tokens_by_exposure"]
    print("start, tokens spelt right by exposure in the SFT words and length:")
    for k, v in start.items():
        print(f"  {k}: {v['right']}/{v['n']} ({v['share']:.0%})")
    write_result(f"spelling-{args.results[0].stem}", out, Path(args.results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
