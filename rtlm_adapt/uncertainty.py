"""Prompt uncertainty scoring: cheap lexical features and one scalar in [0, 1].

After RT-LM (RTSS 2023): vague, ambiguous, open-ended and multi-part inputs tend to yield longer
and less predictable outputs. :class:`UncertaintyScorer` turns a prompt into the named features
below with C-level string methods, set lookups and a few precompiled regular expressions (no
model call; ~20 us per typical prompt) and folds them into a score with a fixed logistic
combination.

Text features look only at the first :data:`SCAN_CHARS` characters, so a 1 MB prompt costs no
more than a 4 kB one; size features (``prompt_tokens_est``, ``n_lines``) cover the whole string.

Features (:data:`FEATURE_NAMES`, in order; every value is a finite float >= 0). Cue "counts"
count each distinct cue word once plus every occurrence of a multi-word cue, after lowercasing and
turning punctuation into spaces (so "step-by-step" matches "step by step"):

``prompt_tokens_est``
    Approximate prompt length in tokens: 4 ASCII characters per token, 1 per non-ASCII
    character (CJK and emoji are roughly a token each).
``log_prompt_tokens``
    ``log1p(prompt_tokens_est)``.
``n_lines``
    Number of lines, ignoring trailing blank ones (1 for a one-line prompt).
``n_sentences``
    Sentences: ". ", "? " and "! " (or the same before a newline) inside the text, plus one.
``n_questions``
    Number of ``?`` characters.
``n_enumerations``
    Numbered or bulleted lines (``1.``, ``2)``, ``a)``, ``-``, ``*``, ``•``).
``n_conjunctions``
    Multi-part markers: "also", "additionally", "then", "as well as", "in addition"...
``open_ended``
    Open-ended request words: write, explain, describe, story, essay, discuss, compare, create,
    poem, blog, plan, guide, tips, ideas, why, "how to", "what if", "come up with"...
``closed_form``
    Closed forms: a leading "what is/who is/when did...", a leading yes/no question ("is", "does",
    "should"... but not "can you"), "name one", "which one", "true or false", "fill in", "how
    many", and closed task verbs (translate, classify, define, identify, correct, convert...).
``vague_hedges``
    Hedges: maybe, somehow, something, any, etc, stuff, things, general, overall, various,
    "kind of", "sort of", "and so on"...
``underspecified_qty``
    Quantities without a number: some, a few, several, many, multiple, lots, "a couple".
``underspecified_request``
    1.0 for a very short request with no closed form and no length cue ("tell me about Rome"),
    or any "tell me about/what do you think" request of at most 15 words, else 0.0.
``short_cue``
    Explicit short-answer cues: "in one word", "one sentence", briefly, short, concise,
    summarize, "tl;dr", "yes or no", "in a few words", "one-line". Pushes the score down.
``long_cue``
    Explicit long-answer cues: detailed, "in depth", comprehensive, thorough, "step by step",
    essay, "long answer"... Pushes the score up.
``requested_tokens_log``
    ``log1p`` of a numeric length request turned into a token target: a number (digits or
    "one".."twenty", "fifty", "hundred") followed within three words by a unit ("500 words",
    "3 short paragraphs", "5 tips"), or right after a listing verb ("list 10", "give me 5").
    Words x 1.3, items (ideas, tips, examples...) x 25, sentences x 20, lines x 12, paragraphs
    x 80, pages x 500, characters x 0.25; the largest request wins; 0.0 when there is none.
``has_code``
    1.0 when the prompt holds code: a ``` fence, an indented code line, or several braces and
    semicolons.
``has_input_passage``
    1.0 when the prompt carries a passage to operate on (text after the first newline or colon
    that the instruction refers to as "given/following/below/this text"..., or that is long);
    rewriting and summarizing tasks have output length tied to that input.
``non_ascii_share``
    Share of non-ASCII characters (mixed scripts, emoji) in the scanned prefix, in [0, 1].

>>> scorer = UncertaintyScorer()
>>> feats, closed = scorer.score_prompt("What is the capital of France?")
>>> feats["closed_form"], feats["n_questions"]
(1.0, 1.0)
>>> _, open_ = scorer.score_prompt("Write a detailed essay about the causes of World War I.")
>>> closed < 0.5 < open_
True
>>> scorer.features("List 10 ideas for a party")["requested_tokens_log"] == math.log1p(250)
True
"""

from __future__ import annotations

import math
import re

#: Text features scan at most this many leading characters; size features see everything.
SCAN_CHARS = 4_000

FEATURE_NAMES: tuple[str, ...] = (
    "prompt_tokens_est",
    "log_prompt_tokens",
    "n_lines",
    "n_sentences",
    "n_questions",
    "n_enumerations",
    "n_conjunctions",
    "open_ended",
    "closed_form",
    "vague_hedges",
    "underspecified_qty",
    "underspecified_request",
    "short_cue",
    "long_cue",
    "requested_tokens_log",
    "has_code",
    "has_input_passage",
    "non_ascii_share",
)

# Cue classes. Single words are found with one C-level set intersection over the prompt's words
# (a Python loop over every word costs ~3x more); multi-word cues with substring counts.
_OPEN, _CLOSED, _HEDGE, _QTY, _SHORT, _LONG, _CONJ, _VAGUE_REQ = range(8)
_N_CLASSES = 8

_WORD_LISTS: dict[int, str] = {
    _OPEN: """write explain describe story stories essay essays discuss compare contrast elaborate
        create generate poem poems blog article plan guide tips ideas suggest suggestions
        brainstorm design develop outline analyze analyse imagine letter speech script recipe
        itinerary why advice recommend recommendations pros cons strategies ways lyrics song
        novel narrative""",
    _CLOSED: """translate classify define definition categorize identify correct convert calculate
        solve spell label extract rate""",
    _HEDGE: """maybe somehow something any anything etc stuff things general overall various
        perhaps whatever generally""",
    _QTY: "some few several many multiple lots couple numerous",
    _SHORT: "briefly brief short shortly concise concisely summarize summarise succinct tldr",
    _LONG: "detailed comprehensive thorough thoroughly lengthy extensive essay essays",
    _CONJ: "also additionally then furthermore moreover plus",
}

# Multi-word cues, matched on the words joined by single spaces (so "step-by-step", "step by
# step" and "Step  by\nstep" all match). Keyed by first word: a phrase is only looked for when
# its first word occurs.
_PHRASE_LISTS: dict[int, tuple[str, ...]] = {
    _CLOSED: (
        "name one",
        "name a",
        "name the",
        "which one",
        "true or false",
        "fill in",
        "how many",
        "how much",
        "how old",
        "how far",
        "how tall",
    ),
    _OPEN: (
        "how to",
        "how do",
        "how does",
        "how can",
        "how could",
        "how should",
        "how would",
        "how might",
        "what if",
        "come up with",
    ),
    _SHORT: (
        "in one word",
        "in 1 word",
        "in a word",
        "in one sentence",
        "in 1 sentence",
        "in a single sentence",
        "in a few words",
        "in two sentences",
        "in 2 sentences",
        "in one line",
        "one word",
        "one sentence",
        "one line",
        "tl dr",
        "yes or no",
        "short answer",
        "no more than",
        "at most",
    ),
    _LONG: (
        "in depth",
        "in detail",
        "step by step",
        "at length",
        "long answer",
        "long response",
        "long essay",
        "long story",
        "long article",
        "long explanation",
        "long post",
        "longer answer",
    ),
    _CONJ: ("and also", "as well as", "in addition"),
    _HEDGE: ("kind of", "sort of", "and so on", "or something"),
    _VAGUE_REQ: (
        "tell me about",
        "tell me something",
        "talk about",
        "what do you think",
        "thoughts on",
    ),
}
_PHRASES: dict[str, list[tuple[str, int]]] = {}
for _cls, _phrases in _PHRASE_LISTS.items():
    for _p in _phrases:
        # Padded with spaces so "in one word" does not match inside "within one wordle".
        _PHRASES.setdefault(_p.split()[0], []).append((f" {_p} ", _cls))

_WORD_CLASSES: dict[str, tuple[int, ...]] = {}
for _cls, _words in _WORD_LISTS.items():
    for _w in _words.split():
        # A word may belong to several classes ("essay" is open-ended and a long cue).
        _WORD_CLASSES[_w] = (*_WORD_CLASSES.get(_w, ()), _cls)

_NUMBER_WORDS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "twelve": 12,
    "fifteen": 15,
    "twenty": 20,
    "fifty": 50,
    "hundred": 100,
}
# Approximate output tokens per requested unit; any other counted noun is an item.
_UNIT_TOKENS = {
    "word": 1.3,
    "sentence": 20.0,
    "line": 12.0,
    "paragraph": 80.0,
    "page": 500.0,
    "character": 0.25,
}
_ITEM_TOKENS = 25.0
_ITEMS = (
    "item example tip idea way reason step point question name suggestion option fact title "
    "sample thing book movie place"
).split()
_COUNT_VERBS = ("list", "give", "name", "provide", "suggest", "generate", "create", "write")
_COUNT_VERBS_SET = frozenset(_COUNT_VERBS)
# Token target per counted word, plurals included: "500 words", "3 paragraphs", "5 ideas".
_COUNT_UNITS: dict[str, float] = {}
for _unit, _tokens in [*_UNIT_TOKENS.items(), *((i, _ITEM_TOKENS) for i in _ITEMS)]:
    _COUNT_UNITS[_unit] = _COUNT_UNITS[_unit + "s"] = _tokens
# Words whose presence makes the (slower) numeric-request scan worth running.
_NUMERIC_TRIGGERS = frozenset([*_COUNT_UNITS, *_COUNT_VERBS])
_VOCAB = frozenset([*_WORD_CLASSES, *_PHRASES, *_NUMERIC_TRIGGERS])

_WH_WORDS = frozenset("what who whom when where which".split())
_WH_AUX = frozenset("is are was were did does do s".split())
_YES_NO_AUX = frozenset(
    "is are does do did can could should will would has have was were am".split()
)
_REFERS_TO_INPUT = (
    " given ",
    " following ",
    " below ",
    " above ",
    " provided ",
    " this ",
    " these ",
    " text ",
    " passage ",
    " paragraph ",
    " sentence ",
    " article ",
    " email ",
    " review ",
    " tweet ",
    " code ",
    " input ",
)

#: Characters that separate words besides whitespace (so "step-by-step." splits into 3 words).
_SPLIT_CHARS = ",.?!:;\"()-'/*[]"
_DIGIT_RE = re.compile(r"[0-9]")
# Line-start patterns begin with a literal "\n" (searched on "\n" + text) rather than a
# MULTILINE "^": re skips ahead to literal prefixes, several times faster on long prompts.
_ENUM_RE = re.compile(r"\n[ \t]*(?:\d{1,3}[.)]|[a-z][.)]|[-*\u2022+])[ \t]+\S")
_INDENTED_CODE_RE = re.compile(r"\n(?: {4}|\t)\S[^\n]*[;{}()=:]")

_ZEROS: dict[str, float] = dict.fromkeys(FEATURE_NAMES, 0.0)


class UncertaintyScorer:
    """Prompt -> named features -> uncertainty in [0, 1]; stateless, cheap and total.

    The score is ``sigmoid(BIAS + sum(w * f(feature)))`` over :attr:`WEIGHTS`, where ``f`` caps
    counts (see :meth:`score`) so that one long prompt cannot saturate the logistic on its own.

    Examples
    --------
    >>> s = UncertaintyScorer()
    >>> s.score(s.features("Answer yes or no: is 7 prime?")) < 0.5
    True
    >>> sorted(s.features("")) == sorted(FEATURE_NAMES)
    True
    """

    # Round weights with the signs RT-LM argues for, checked on AlpacaEval (805 prompts x 16
    # models): Spearman rho between the score and each prompt's mean response length in
    # characters is +0.46 (Kendall tau +0.32; see tests/test_uncertainty.py). Each feature's own
    # rho is in brackets where it guided the weight; features with no signal keep a small prior
    # weight (dropping any one of those moves the overall rho by less than 0.01).
    BIAS: float = -1.0  # puts the AlpacaEval median score near 0.5
    WEIGHTS: dict[str, float] = {
        "log_prompt_tokens": 0.25,  # size prior (+0.03)
        "n_questions": 0.25,  # (+0.12)
        "n_enumerations": 0.25,  # multi-part prior (-0.12 on 1% of prompts)
        "n_conjunctions": 0.25,  # multi-part prior (-0.02)
        "open_ended": 0.5,  # (+0.35, the strongest single cue)
        "closed_form": -0.5,  # (-0.20)
        "vague_hedges": 0.25,  # vagueness prior (-0.02)
        "underspecified_qty": 0.25,  # (+0.08)
        "underspecified_request": 0.25,  # vagueness prior (-0.03)
        "short_cue": -1.0,  # (-0.06 on 4% of prompts)
        "long_cue": 1.0,  # (+0.18 on 3% of prompts)
        "requested_tokens_log": 0.5,  # explicit targets: +/- around PIVOTS
        "has_code": 0.25,  # code answers run long (1 prompt in AlpacaEval: no evidence)
        "has_input_passage": -1.0,  # (-0.30): the answer is tied to a given, often short, input
    }
    #: Values are capped here before weighting (default :attr:`COUNT_CAP`).
    CAPS: dict[str, float] = {"log_prompt_tokens": 8.0, "requested_tokens_log": 9.0}
    #: A non-zero value contributes ``w * (min(value, cap) - pivot)``; pivot 5.0 for requested
    #: tokens is ~150 tokens, so "in one word" lowers the score and "500 words" raises it.
    PIVOTS: dict[str, float] = {"requested_tokens_log": 5.0}
    #: Counts are capped at this before weighting: the third hedge says little the first did not.
    COUNT_CAP: float = 3.0

    def __init__(self) -> None:
        # (name, weight, cap, pivot) resolved once so score() is a short loop.
        self._terms: tuple[tuple[str, float, float, float], ...] = tuple(
            (name, w, self.CAPS.get(name, self.COUNT_CAP), self.PIVOTS.get(name, 0.0))
            for name, w in self.WEIGHTS.items()
            if w != 0.0
        )

    def features(self, prompt: str) -> dict[str, float]:
        """Return the named features of ``prompt`` (keys: :data:`FEATURE_NAMES`, in order).

        Parameters
        ----------
        prompt
            Any string; text features scan only its first :data:`SCAN_CHARS` characters.

        Raises
        ------
        TypeError
            If ``prompt`` is not a ``str``.

        Examples
        --------
        >>> f = UncertaintyScorer().features("Who is Ada Lovelace? When did she live? Be brief.")
        >>> f["short_cue"], f["n_questions"], f["closed_form"]
        (1.0, 2.0, 1.0)
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        text = prompt[:SCAN_CHARS]
        if not text.strip():
            return dict(_ZEROS)
        low = text.lower()

        # Non-ASCII share: encode-and-drop runs in C; the fast path skips it for ASCII text.
        non_ascii = 0.0 if text.isascii() else 1.0 - len(text.encode("ascii", "ignore")) / len(text)
        tokens = len(prompt) * (0.25 + 0.75 * non_ascii)

        # Punctuation to spaces, then split: ~2x faster than a regex findall of words.
        spaced = low
        for ch in _SPLIT_CHARS:
            spaced = spaced.replace(ch, " ")
        words = spaced.split()
        counts = [0.0] * _N_CLASSES
        hits = _VOCAB.intersection(words)  # distinct cue words, found in C
        norm = ""
        for w in hits:
            for c in _WORD_CLASSES.get(w, ()):
                counts[c] += 1.0
            phrases = _PHRASES.get(w)
            if phrases is not None:
                if not norm:
                    norm = " " + " ".join(words) + " "
                for phrase, c in phrases:
                    counts[c] += norm.count(phrase)
        if len(words) >= 2:
            first, second = words[0], words[1]
            if (first in _WH_WORDS and second in _WH_AUX) or (
                first in _YES_NO_AUX and second != "you"
            ):
                counts[_CLOSED] += 1.0

        requested = 0.0
        if not _NUMERIC_TRIGGERS.isdisjoint(hits) and (
            _DIGIT_RE.search(low) is not None or not _NUMBER_WORDS.keys().isdisjoint(words)
        ):
            requested = _requested_tokens(words)

        # Inner sentence ends plus the last sentence; C-level counts beat a regex here.
        flat = text.rstrip().replace("\n", " ")
        n_sentences = flat.count(". ") + flat.count("? ") + flat.count("! ") + 1
        n_words = len(words)
        short_request = (
            n_words <= 8 and counts[_CLOSED] == 0 and counts[_SHORT] == 0 and requested == 0.0
        )
        lines_text = "\n" + text if "\n" in text else ""
        has_code = (
            "```" in text
            or text.count("{") + text.count(";") >= 4
            or (
                ("\n    " in lines_text or "\n\t" in lines_text)
                and _INDENTED_CODE_RE.search(lines_text) is not None
            )
        )

        return {
            "prompt_tokens_est": tokens,
            "log_prompt_tokens": math.log1p(tokens),
            "n_lines": float(prompt.rstrip().count("\n") + 1),
            "n_sentences": float(n_sentences),
            "n_questions": float(text.count("?")),
            "n_enumerations": float(len(_ENUM_RE.findall(lines_text))),
            "n_conjunctions": counts[_CONJ],
            "open_ended": counts[_OPEN],
            "closed_form": counts[_CLOSED],
            "vague_hedges": counts[_HEDGE],
            "underspecified_qty": counts[_QTY],
            "underspecified_request": float(
                short_request or (counts[_VAGUE_REQ] > 0 and n_words <= 15)
            ),
            "short_cue": counts[_SHORT],
            "long_cue": counts[_LONG],
            "requested_tokens_log": math.log1p(requested),
            "has_code": float(has_code),
            "has_input_passage": float(_has_input_passage(low)),
            "non_ascii_share": non_ascii,
        }

    def score(self, features: dict[str, float]) -> float:
        """Fold ``features`` into an uncertainty in [0, 1] (higher: longer, less predictable).

        ``z = BIAS + sum(w * (min(value, cap) - pivot))`` over the non-zero weighted features
        (:attr:`WEIGHTS`, :attr:`CAPS`, :attr:`PIVOTS`), then ``1 / (1 + exp(-z))``. Missing
        keys count as 0; nan values are ignored.

        Examples
        --------
        >>> s = UncertaintyScorer()
        >>> 0.0 <= s.score(s.features("hello")) <= 1.0
        True
        """
        try:
            get = features.get
        except AttributeError:
            raise TypeError(
                "UncertaintyScorer.score takes the features mapping of features(prompt) "
                f"(score_prompt takes a prompt), got {type(features).__name__}"
            ) from None
        z = self.BIAS
        for name, w, cap, pivot in self._terms:
            value = get(name, 0.0)
            if value > 0.0:  # absent cues say nothing (and a pivot must not fire on them)
                z += w * (min(value, cap) - pivot)
        # Clamp so exp() cannot overflow on hostile feature dicts; nan falls through to 0.5.
        z = max(-50.0, min(50.0, z)) if z == z else 0.0
        return 1.0 / (1.0 + math.exp(-z))

    def score_prompt(self, prompt: str) -> tuple[dict[str, float], float]:
        """Return ``(features(prompt), score(features))``.

        Examples
        --------
        >>> scorer = UncertaintyScorer()
        >>> feats, vague = scorer.score_prompt("Tell me about Rome")
        >>> feats["underspecified_request"], vague > scorer.score_prompt("What is 2 + 2?")[1]
        (1.0, True)
        """
        feats = self.features(prompt)
        return feats, self.score(feats)


def _requested_tokens(words: list[str]) -> float:
    """Largest numeric length request in ``words`` as an approximate token target (0 if none).

    A number followed within three words by a unit ("3 short paragraphs") uses that unit; a
    number right after a listing verb ("list 10", "give me at least 5") counts items.
    """
    # Find the few number tokens with C-level set and filter calls, then visit only those.
    numbers = _NUMBER_WORDS.keys() & words
    numbers.update(w for w in filter(str.isdecimal, words) if len(w) <= 5)
    best = 0.0
    for word in numbers:
        n = _NUMBER_WORDS.get(word) or int(word)  # isdecimal: int() accepts it
        i = -1
        while True:
            try:
                i = words.index(word, i + 1)
            except ValueError:
                break
            for unit in words[i + 1 : i + 4]:
                tokens = _COUNT_UNITS.get(unit)
                if tokens is not None:
                    best = max(best, n * tokens)
                    break
            else:
                if not _COUNT_VERBS_SET.isdisjoint(words[max(0, i - 4) : i]):
                    best = max(best, n * _ITEM_TOKENS)
    return best


def _has_input_passage(low: str) -> bool:
    """Whether ``low`` (lowercased) is an instruction followed by a passage to work on."""
    cut = low.find("\n")
    colon = low.find(": ")
    if colon != -1 and (cut == -1 or colon < cut):
        cut = colon
    if cut == -1 or len(low) - cut < 3:
        return False
    if len(low) - cut >= 400:
        return True
    head = " " + low[:cut].replace(",", " ").replace(".", " ") + " "
    return any(ref in head for ref in _REFERS_TO_INPUT)
