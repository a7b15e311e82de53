"""VADER sentiment lexicon: 7,520 words and emoticons with a human valence in -4..4 (short-text regression).

Raw form (PyPI ``vaderSentiment`` 3.3.2, installed with --no-deps; the file is read from the installed
package, which is never imported): ``vader_lexicon.txt``, UTF-8 with CRLF line ends, one entry a line,
four tab-separated fields: token, mean valence, standard deviation, and the ten human ratings (integers in
-4..4) as a list, e.g. ``good	1.9	0.9434	[2, 1, 1, 3, 2, 4, 2, 2, 1, 1]``. The ``sd`` is the population
standard deviation of the ten ratings (it matches for all but 5 entries; ``repetitive`` has 0.06325 for
0.6325).

Prepared file ``lexicon.jsonl``, one entry a line in file order: ``{"text": "good", "valence": 1.9, "sd":
0.9434}``. All 7,520 lines are kept, although 14 tokens appear twice with different values, once among the
emoticons and slang at the top of the file and once further down (``lol`` 2.9 and 1.8, ``sob`` -2.8 and
-1.0, ``d:`` -2.9 and 1.2, ``ok``, ``xd`` ...; ``d:`` -2.9 reads like a case-folded ``D:``). vaderSentiment's
own dict keeps the *second*, a source with ``dedupe = true`` the first. 12 more entries differ from another
only in case (``:D``/``:d``, ``O_o``/``o_O``/``o_o``), which an uncased tokenizer cannot tell apart. No entry
has valence 0 (the lexicon lists only non-neutral tokens): 3,347 positive, 4,173 negative, from -3.9 to 3.4.
7,227 entries are lower-case words (letters, ``'`` and ``-``); 180 have no letter at all (``:)``, ``</3``);
4 hold a space (``fed up``, ``can't stand``); two are not ASCII (``:Þ``, ``:-Þ``).

How noisy the target is: the mean per-entry ``sd`` is 0.91 (median 0.83; 7 % of entries above 1.5, e.g.
``flirtatious`` 0.5 +- 2.5), against a spread of valence across entries of 1.70 (sd). Single raters thus
disagree by about half the range a model must cover. The target is the mean of ten ratings, whose own
error variance (sample variance / 10, averaged) is 0.105 against a valence variance of 2.90: an RMSE floor
of about 0.32 and an R^2 ceiling of about 0.96 for a perfect model; predicting the mean for every entry
gives MAE 1.53.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from . import Install

NAME = "vader"
INSTALL = Install(pip_no_deps=("vaderSentiment",))

N_RATINGS = 10
RATING_RANGE = (-4, 4)


def lexicon_path() -> Path:
    """``vader_lexicon.txt`` inside the installed vaderSentiment package (found without importing it)."""
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("vaderSentiment is not installed; run `scripts/install_data.sh vader`")
    path = Path(list(spec.submodule_search_locations)[0]) / "vader_lexicon.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed vaderSentiment package")
    return path


def read_lexicon(path: Path) -> list[dict]:
    """Every entry of a VADER lexicon file in file order: ``text``, ``valence``, ``sd`` and the ``ratings``."""
    entries = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            raise ValueError(f"{path}:{number}: expected 4 tab-separated fields (token, mean, sd, ratings), "
                             f"got {len(fields)}: {line!r}")
        text, valence, sd, ratings = fields
        try:
            ratings = json.loads(ratings)
            entry = {"text": text, "valence": float(valence), "sd": float(sd), "ratings": ratings}
        except ValueError as error:
            raise ValueError(f"{path}:{number}: cannot parse {line!r}: {error}") from None
        low, high = RATING_RANGE
        if (not isinstance(ratings, list) or len(ratings) != N_RATINGS
                or not all(isinstance(r, int) and low <= r <= high for r in ratings)):
            raise ValueError(f"{path}:{number}: expected {N_RATINGS} integer ratings in {low}..{high}, "
                             f"got {fields[3]!r}")
        entries.append(entry)
    return entries


def prepare(out_dir: Path) -> None:
    with open(out_dir / "lexicon.jsonl", "w", encoding="utf-8") as out:
        for entry in read_lexicon(lexicon_path()):
            row = {"text": entry["text"], "valence": entry["valence"], "sd": entry["sd"]}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
