"""Web-text filters: decide which web documents are worth training on, clean the rest.

Common Crawl text is mostly menus, cookie banners, spam, lists and near copies of other
pages. This module holds the rules that FineWeb (Penedo et al. 2024) used to turn it into
good training text, written with the standard library and numpy only, as pure functions
that prepare.py runs in worker processes:

    text, reason = filter_document(text, headers, settings)   # one document, any process
    signature = dedup_signature(text, settings)               # any process
    reason = deduplicator.check(signature)                    # one process, in document order

A dropped document gets exactly one reason, the first rule that drops it, in this order
(FineWeb's order, then ours for what FineWeb did elsewhere):

    empty                  the text is blank
    language:*             WET language header, or an English stop-word ratio without one
    gopher_repetition:*    repeated lines, paragraphs and n-grams (Rae et al. 2021, table A1)
    gopher_quality:*       word counts, symbols, bullets, stop words (Rae et al. 2021, appendix A)
    c4:*                   C4's line cleanup; drops whole pages for a few rules (Raffel et al. 2020)
    fineweb:*              FineWeb's own three rules (Penedo et al. 2024)
    dedup:exact            same normalised text as a document kept earlier in the run
    dedup:near             MinHash LSH match with a document kept earlier in the run

Deliberate differences from FineWeb's pipeline (Penedo et al. 2024, section 3): it
extracts text from the WARC files' HTML with trafilatura (a dependency; the paper found it
better than the WET text read here); its URL blocklist is not here (a list to fetch and
keep up to date); its language filter is fastText's identifier, English at a score of at
least 0.65 (a model file), here the WET header's CLD2 label; its MinHash deduplication ran
per crawl and kept one document per cluster of matches, here it runs over everything
prepared together and keeps the first copy in file order, the same for any number of
tasks (Deduplicator); exact deduplication is ours.

Every reason is "filter:rule" (DROP_REASONS lists them all), so a report can count both
per filter (the part before ":") and per rule. Kept documents then get their email
addresses and public IPv4 addresses replaced (mask_pii). Every filter can be switched off
and every threshold is a field of WebFilterSettings, default the published value.

Definitions used throughout (the papers leave them open; datatrove, FineWeb's code, uses
NLTK for words, which we do not have):
- a line is a line of the text stripped of surrounding whitespace; blank lines are ignored.
- a paragraph is a block of lines between blank lines.
- a word is a whitespace-separated token with ASCII punctuation stripped from both ends;
  a token that is only punctuation is not a word (as datatrove drops NLTK's punctuation
  tokens). Character fractions over words count the characters of the words.

`python bench.py --what=webfilters --mb=50` measures the per-document pass plus the
MinHash signature on one core, on generated English-like text.

Example:
    settings = WebFilterSettings(gopher_min_words=20, c4_terminal_punct=True)
    deduplicator = Deduplicator(settings)
    for headers, page in wet_records:
        text, reason = filter_document(page, headers, settings)
        if text is not None:
            reason = deduplicator.check(dedup_signature(text, settings))
        dropped[reason] += 1 if reason else 0
"""
import dataclasses
import hashlib
import itertools
import ipaddress
import re
import string
import zlib
from dataclasses import dataclass, field

import numpy as np

from owngpt.flags import at_least, between


# ----------------------------------------------------------------------------- settings

def _option(default, help_text, check=None):
    """A setting: its default, its --help line, and the flags check of a valid value."""
    return field(default=default, metadata={"help": help_text, **({"check": check} if check else {})})


# What a valid threshold is: a share of lines, words or characters is a fraction; a count,
# a length or a per-word ratio (a page may hold more '#' than words) is not negative.
FRACTION = between(0, 1)
COUNT = at_least(0)
POSITIVE = at_least(1)


def language_codes(codes):
    """The check of --languages: every item an ISO 639-3 code, as Common Crawl writes them."""
    return None if all(re.fullmatch(r"[a-z]{3}", code) for code in codes) else "ISO 639-3 codes such as eng,deu"


@dataclass(frozen=True)
class WebFilterSettings:
    """Every switch and threshold of the web filters; defaults are the published ones."""
    # language
    language: bool = _option(True, "drop documents not in `languages`")
    languages: tuple = _option(("eng",), "ISO 639-3 codes: the first language of the WET "
                               "header must be one of them (Common Crawl's CLD2 labels)", language_codes)
    language_min_stop_word_ratio: float = _option(
        0.15, "without a language header: a smaller share of English stop words among the "
        "words means not English (ours: English prose measures 0.3-0.5, French, German, "
        "Spanish, Dutch, Italian and Portuguese under 0.1)", FRACTION)
    # Gopher quality: Rae et al. 2021, appendix A; datatrove GopherQualityFilter defaults
    gopher_quality: bool = _option(True, "Gopher quality rules")
    gopher_min_words: int = _option(50, "Gopher: fewer words drops the document", COUNT)
    gopher_max_words: int = _option(100_000, "Gopher: more words drops the document", COUNT)
    gopher_min_mean_word_length: float = _option(3.0, "Gopher: shorter mean word length drops", COUNT)
    gopher_max_mean_word_length: float = _option(10.0, "Gopher: longer mean word length drops", COUNT)
    gopher_max_hash_ratio: float = _option(0.1, "Gopher: more '#' per word drops", COUNT)
    gopher_max_ellipsis_ratio: float = _option(0.1, "Gopher: more '...' or '…' per word drops", COUNT)
    gopher_max_bullet_lines: float = _option(0.9, "Gopher: a larger fraction of lines starting "
                                             "with a bullet drops", FRACTION)
    gopher_max_ellipsis_lines: float = _option(0.3, "Gopher: a larger fraction of lines ending "
                                               "with an ellipsis drops", FRACTION)
    gopher_min_alpha_words: float = _option(0.8, "Gopher: a smaller fraction of words with a "
                                            "letter drops", FRACTION)
    gopher_min_stop_words: int = _option(2, "Gopher: fewer occurrences of the, be, to, of, "
                                         "and, that, have, with drops", COUNT)
    # Gopher repetition: Rae et al. 2021, table A1; datatrove GopherRepetitionFilter defaults
    gopher_repetition: bool = _option(True, "Gopher repetition rules")
    gopher_max_dup_line_fraction: float = _option(0.3, "Gopher: fraction of lines that repeat "
                                                  "an earlier line", FRACTION)
    gopher_max_dup_paragraph_fraction: float = _option(0.3, "Gopher: fraction of paragraphs "
                                                       "that repeat an earlier one", FRACTION)
    gopher_max_dup_line_chars: float = _option(0.2, "Gopher: fraction of characters in "
                                               "repeated lines", FRACTION)
    gopher_max_dup_paragraph_chars: float = _option(0.2, "Gopher: fraction of characters in "
                                                    "repeated paragraphs", FRACTION)
    gopher_max_top_2gram: float = _option(0.20, "Gopher: characters in the most frequent 2-gram", FRACTION)
    gopher_max_top_3gram: float = _option(0.18, "Gopher: characters in the most frequent 3-gram", FRACTION)
    gopher_max_top_4gram: float = _option(0.16, "Gopher: characters in the most frequent 4-gram", FRACTION)
    gopher_max_dup_5gram: float = _option(0.15, "Gopher: characters in repeated 5-grams", FRACTION)
    gopher_max_dup_6gram: float = _option(0.14, "Gopher: characters in repeated 6-grams", FRACTION)
    gopher_max_dup_7gram: float = _option(0.13, "Gopher: characters in repeated 7-grams", FRACTION)
    gopher_max_dup_8gram: float = _option(0.12, "Gopher: characters in repeated 8-grams", FRACTION)
    gopher_max_dup_9gram: float = _option(0.11, "Gopher: characters in repeated 9-grams", FRACTION)
    gopher_max_dup_10gram: float = _option(0.10, "Gopher: characters in repeated 10-grams", FRACTION)
    # C4: Raffel et al. 2020 section 2.2, as TFDS c4_utils.clean_page and datatrove
    # C4QualityFilter implement it, configured as FineWeb ran it (terminal punctuation off)
    c4: bool = _option(True, "C4 line cleanup and page rules")
    c4_terminal_punct: bool = _option(False, "C4: drop lines not ending in . ? ! \" "
                                      "(C4 did; FineWeb turned it off)")
    c4_min_words_per_line: int = _option(3, "C4: drop lines with fewer words", COUNT)
    c4_max_word_length: int = _option(1000, "C4: drop lines with a longer word", POSITIVE)
    c4_remove_citations: bool = _option(True, "C4: strip [1], [edit], [citation needed]")
    c4_drop_javascript_lines: bool = _option(True, "C4: drop lines mentioning javascript")
    c4_drop_policy_lines: bool = _option(True, "C4: drop cookie / privacy policy / terms of "
                                         "use lines")
    c4_drop_lorem_ipsum: bool = _option(True, "C4: drop pages containing 'lorem ipsum'")
    c4_drop_curly_bracket: bool = _option(True, "C4: drop pages containing '{'")
    c4_min_sentences: int = _option(5, "C4: drop pages with fewer sentences left (0: off)", COUNT)
    # FineWeb: Penedo et al. 2024, its custom filters (datatrove FineWebQualityFilter)
    fineweb: bool = _option(True, "FineWeb's three quality rules")
    fineweb_line_punct_ratio: float = _option(0.12, "FineWeb: drop if at most this fraction "
                                              "of lines ends in . ' \" ! ?", FRACTION)
    fineweb_short_line_length: int = _option(30, "FineWeb: a line of at most this many "
                                             "characters is short", COUNT)
    fineweb_short_line_ratio: float = _option(0.67, "FineWeb: drop if at least this fraction "
                                              "of lines is short", FRACTION)
    fineweb_dup_line_chars: float = _option(0.1, "FineWeb: drop if at least this fraction of "
                                            "characters is in repeated lines (paper: 0.1; "
                                            "datatrove's default: 0.01)", FRACTION)
    # deduplication across the run: FineWeb's MinHash configuration
    dedup_exact: bool = _option(True, "drop documents whose normalised text was kept before")
    dedup_near: bool = _option(True, "drop MinHash near duplicates of documents kept before")
    minhash_ngram: int = _option(5, "MinHash: words per shingle (FineWeb: 5)", POSITIVE)
    minhash_bands: int = _option(14, "MinHash: LSH bands (FineWeb: 14)", POSITIVE)
    minhash_rows: int = _option(8, "MinHash: hashes per band (FineWeb: 8)", POSITIVE)
    minhash_seed: int = _option(1, "MinHash: seed of the hash functions", COUNT)
    # personal information
    pii: bool = _option(True, "replace emails by email@example.com and public IPv4 "
                        "addresses by 0.0.0.0")


DEFAULT_SETTINGS = WebFilterSettings()


def settings_flags():
    """The settings as flags.parse takes them: defaults, help lines and value checks, each a
    dict by field name (a switch needs no check: true or false is all the parser takes)."""
    fields = dataclasses.fields(WebFilterSettings)
    return ({f.name: f.default for f in fields}, {f.name: f.metadata["help"] for f in fields},
            {f.name: f.metadata["check"] for f in fields if "check" in f.metadata})


# ----------------------------------------------------------------------------- the pass

# Gopher's stop words (Rae et al. 2021, appendix A).
GOPHER_STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
# Frequent English function words that are not also frequent words in other languages
# written in Latin script ("a", "as", "do", "no", "so", "he" were left out for that reason).
ENGLISH_STOP_WORDS = frozenset("""
about after all also an and any are at be because been but by can could did does for from
had has have her his how i if in into is it its just more most my not of on one only or
other our out she some than that the their them then there these they this those to up us
was we were what when where which who will with would you your""".split())
BULLETS = ("•", "●", "○", "◦", "▪", "▫", "■", "□", "‣", "⁃", "-", "*")
ELLIPSES = ("...", "…")
LANGUAGE_HEADER = "WARC-Identified-Content-Language"

# The filters' switches, as meta.json lists them.
SWITCHES = ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "dedup_exact",
            "dedup_near", "pii")
DROP_REASONS = (
    "empty",
    "language:header", "language:stop_words", "language:unknown",
    "gopher_repetition:dup_line_fraction", "gopher_repetition:dup_paragraph_fraction",
    "gopher_repetition:dup_line_chars", "gopher_repetition:dup_paragraph_chars",
    *(f"gopher_repetition:top_{n}gram" for n in (2, 3, 4)),
    *(f"gopher_repetition:dup_{n}gram" for n in range(5, 11)),
    "gopher_quality:word_count", "gopher_quality:mean_word_length", "gopher_quality:hash_ratio",
    "gopher_quality:ellipsis_ratio", "gopher_quality:bullet_lines",
    "gopher_quality:ellipsis_lines", "gopher_quality:alpha_words", "gopher_quality:stop_words",
    "c4:lorem_ipsum", "c4:curly_bracket", "c4:no_lines_left", "c4:min_sentences",
    "fineweb:line_punct_ratio", "fineweb:short_line_ratio", "fineweb:dup_line_chars",
    "dedup:exact", "dedup:near",
)


def filter_document(text, headers=None, settings=DEFAULT_SETTINGS):
    """(cleaned text, None) for a kept document, (None, reason) for a dropped one.
    headers: the WARC record's headers (a dict), or None for text that has none."""
    if not text.strip():
        return None, "empty"
    lines = nonblank_lines(text)
    words = split_words(text)
    reason = None
    if settings.language:
        reason = language_reason(words, headers, settings)
    if reason is None and settings.gopher_repetition:
        reason = gopher_repetition_reason(text, lines, words, settings)
    if reason is None and settings.gopher_quality:
        reason = gopher_quality_reason(text, lines, words, settings)
    if reason is None and settings.c4:
        lines, reason = c4_clean_lines(lines, settings)
        text = "\n".join(lines)
    if reason is None and settings.fineweb:
        reason = fineweb_reason(lines, settings)
    if reason is not None:
        return None, reason
    return (mask_pii(text) if settings.pii else text), None


def nonblank_lines(text):
    return [line for line in (raw.strip() for raw in text.splitlines()) if line]


def split_words(text):
    # map/filter keep the loop in C: this runs on every byte of the corpus
    return list(filter(None, map(str.strip, text.split(), itertools.repeat(string.punctuation))))


# ----------------------------------------------------------------------------- language

def language_reason(words, headers, settings):
    """The WET header's first language (Common Crawl's CLD2 guess, most likely first) must
    be wanted (FineWeb ran fastText's identifier instead: see the module's docstring).
    Without a header only English can be recognised: a document is English when at least
    language_min_stop_word_ratio of its words are English stop words."""
    header = _header(headers, LANGUAGE_HEADER)
    if header:
        first_language = header.split(",")[0].strip().lower()
        return None if first_language in settings.languages else "language:header"
    if "eng" not in settings.languages:
        return "language:unknown"
    stop_words = sum(map(ENGLISH_STOP_WORDS.__contains__, map(str.lower, words)))
    if not words or stop_words / len(words) < settings.language_min_stop_word_ratio:
        return "language:stop_words"
    return None


def _header(headers, name):
    """WARC header names are case-insensitive."""
    if not headers:
        return None
    if name in headers:
        return headers[name]
    lowered = name.lower()
    return next((value for key, value in headers.items() if key.lower() == lowered), None)


# ----------------------------------------------------------------------------- Gopher

def gopher_quality_reason(text, lines, words, settings):
    """Rae et al. 2021, appendix A, in datatrove's order. Bounds are inclusive: a value
    equal to a threshold is kept, as "more than 90%" / "at least two" read."""
    s = settings
    word_count = len(words)
    if word_count == 0 or not s.gopher_min_words <= word_count <= s.gopher_max_words:
        return "gopher_quality:word_count"
    mean_word_length = sum(map(len, words)) / word_count
    if not s.gopher_min_mean_word_length <= mean_word_length <= s.gopher_max_mean_word_length:
        return "gopher_quality:mean_word_length"
    if text.count("#") / word_count > s.gopher_max_hash_ratio:
        return "gopher_quality:hash_ratio"
    if (text.count("...") + text.count("…")) / word_count > s.gopher_max_ellipsis_ratio:
        return "gopher_quality:ellipsis_ratio"
    if sum(line.startswith(BULLETS) for line in lines) / len(lines) > s.gopher_max_bullet_lines:
        return "gopher_quality:bullet_lines"
    if sum(line.endswith(ELLIPSES) for line in lines) / len(lines) > s.gopher_max_ellipsis_lines:
        return "gopher_quality:ellipsis_lines"
    # The share of tokens with a letter counts every token, symbols too, as datatrove's
    # GopherQualityFilter (FineWeb) does: a dump of code, whose "=", "+", "->" and "0" stand
    # alone, must not pass as prose because the stripped words (`words`) leave its symbols out.
    # Deliberate difference: datatrove's word tokenizer splits "word," in two, these white-space
    # tokens keep the comma on the word, so prose counts a little higher here than there.
    tokens = text.split()
    not_all_letters = itertools.filterfalse(str.isalpha, tokens)  # most tokens are skipped in C
    with_a_letter = len(tokens) - sum(1 for token in not_all_letters if not _LETTER.search(token))
    if with_a_letter / len(tokens) < s.gopher_min_alpha_words:
        return "gopher_quality:alpha_words"
    stop_words = sum(map(GOPHER_STOP_WORDS.__contains__, map(str.lower, words)))
    if stop_words < s.gopher_min_stop_words:  # occurrences, not distinct words
        return "gopher_quality:stop_words"
    return None


_LETTER = re.compile(r"[^\W\d_]")


def gopher_repetition_reason(text, lines, words, settings):
    """Rae et al. 2021, table A1, in the table's order. "Duplicate" means a second or
    later occurrence: the first copy of a line is not counted against the page."""
    s = settings
    paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]
    line_dups, line_dup_chars, line_chars = duplicate_stats(lines)
    para_dups, para_dup_chars, para_chars = duplicate_stats(paragraphs)
    if line_dups / len(lines) > s.gopher_max_dup_line_fraction:
        return "gopher_repetition:dup_line_fraction"
    if para_dups / len(paragraphs) > s.gopher_max_dup_paragraph_fraction:
        return "gopher_repetition:dup_paragraph_fraction"
    if line_dup_chars / line_chars > s.gopher_max_dup_line_chars:
        return "gopher_repetition:dup_line_chars"
    if para_dup_chars / para_chars > s.gopher_max_dup_paragraph_chars:
        return "gopher_repetition:dup_paragraph_chars"
    return ngram_repetition_reason(words, settings)


_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def duplicate_stats(items):
    """(repeated items, characters in them, characters in all), repeats after the first."""
    seen = set()
    duplicates = duplicate_chars = total_chars = 0
    for item in items:
        total_chars += len(item)
        if item in seen:
            duplicates += 1
            duplicate_chars += len(item)
        else:
            seen.add(item)
    return duplicates, duplicate_chars, total_chars


def ngram_repetition_reason(words, settings):
    """Top 2/3/4-gram and duplicated 5..10-gram character fractions, vectorised: each
    n-gram is a 64-bit rolling hash of word ids (a collision is a 2**-64 event)."""
    # Python's str hash differs between processes, but only equal words get equal ids,
    # which is all the counting below uses.
    ids = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    total_chars = int(lengths.sum())
    length_prefix = np.concatenate(([0], np.cumsum(lengths)))
    keys = ids
    repeated = True
    for n in range(2, 11):
        if not repeated or len(words) < n:  # no repeated n-gram: no longer one repeats either
            return None
        keys = keys[:-1] * _NGRAM_MULTIPLIER + ids[n - 1:]  # uint64 arithmetic wraps mod 2**64
        if n <= 4:
            chars = _top_ngram_chars(keys, length_prefix[n:] - length_prefix[:-n])
            limit = getattr(settings, f"gopher_max_top_{n}gram")
            reason = f"gopher_repetition:top_{n}gram"
        else:
            chars = _duplicated_ngram_chars(keys, lengths, n)
            limit = getattr(settings, f"gopher_max_dup_{n}gram")
            reason = f"gopher_repetition:dup_{n}gram"
        repeated = chars > 0
        if chars / total_chars > limit:
            return reason
    return None


_NGRAM_MULTIPLIER = np.uint64(0x100000001B3)  # the 64-bit FNV prime: odd, well mixed


def _top_ngram_chars(keys, ngram_chars):
    """Characters of the most frequent n-gram times its count (the longest one on a tie);
    0 when no n-gram occurs twice: a page without repeats is not repetitive, however
    short (datatrove counts the single n-gram, which drops every page of under ~10 words)."""
    _, first_position, counts = np.unique(keys, return_index=True, return_counts=True)
    top_count = counts.max()
    if top_count == 1:
        return 0
    return int(top_count) * int(ngram_chars[first_position[counts == top_count]].max())


def _duplicated_ngram_chars(keys, lengths, n):
    """Characters of the words covered by any repeat of an n-gram, each word counted once
    even where repeats overlap (Rae et al.: "taking care not to count characters that
    occur in overlapping n-grams more than once")."""
    _, first_position, inverse = np.unique(keys, return_index=True, return_inverse=True)
    repeat_starts = np.flatnonzero(first_position[inverse] != np.arange(len(keys)))
    if len(repeat_starts) == 0:
        return 0
    # +1 where a repeat starts, -1 where it ends; words with a positive running sum are covered
    boundaries = (np.bincount(repeat_starts, minlength=len(lengths) + 1)
                  - np.bincount(repeat_starts + n, minlength=len(lengths) + 1))
    covered = np.cumsum(boundaries)[:len(lengths)] > 0
    return int(lengths[covered].sum())


# ----------------------------------------------------------------------------- C4

C4_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
C4_END_MARKS = (".", "?", "!", '"')
C4_POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
                     "use of cookies", "use cookies")
# Sentence ends for C4's page rule: C4 used NLTK's punkt; this counts runs of . ! ? that
# end a line or precede whitespace, so "e.g. this" counts one too many. A line is at
# least one sentence. A match starts only at the start of a run and never backtracks
# (++, *+), so a line of 100,000 dots costs linear time, not quadratic.
_SENTENCE_END = re.compile(r"(?<![.!?])[.!?]++[\"')\]]*+(?=\s|$)")


def c4_clean_lines(lines, settings):
    """(kept lines, None) or ([], reason). The rules of C4's clean_page (TFDS c4_utils),
    applied to each line in its order, so a page rule (lorem ipsum, '{') only sees lines
    that survived the line rules before it; the bad-words list is not applied."""
    s = settings
    kept = []
    sentences = 0
    for line in lines:
        words = line.split()
        if len(line) > s.c4_max_word_length and any(len(w) > s.c4_max_word_length for w in words):
            continue
        if s.c4_remove_citations and "[" in line:
            line = C4_CITATION.sub("", line).strip()
        if s.c4_terminal_punct and (not line.endswith(C4_END_MARKS) or line.endswith("...")):
            continue
        if len(words) < s.c4_min_words_per_line:
            continue
        lowered = line.lower()
        if s.c4_drop_lorem_ipsum and "lorem ipsum" in lowered:
            return [], "c4:lorem_ipsum"
        if s.c4_drop_javascript_lines and "javascript" in lowered:
            continue
        if s.c4_drop_curly_bracket and "{" in line:
            return [], "c4:curly_bracket"
        if s.c4_drop_policy_lines and any(phrase in lowered for phrase in C4_POLICY_PHRASES):
            continue
        sentences += max(1, len(_SENTENCE_END.findall(line)))
        kept.append(line)
    if not kept:
        return [], "c4:no_lines_left"
    if sentences < s.c4_min_sentences:
        return [], "c4:min_sentences"
    return kept, None


# ----------------------------------------------------------------------------- FineWeb

FINEWEB_END_MARKS = (".", "'", '"', "!", "?")


def fineweb_reason(lines, settings):
    """FineWeb's custom filters (Penedo et al. 2024) with datatrove's comparisons: a page
    at or past a threshold is dropped (<= for punctuation, >= for the other two), and a
    short line has at most fineweb_short_line_length characters."""
    s = settings
    punctuated = sum(line.endswith(FINEWEB_END_MARKS) for line in lines)
    if punctuated / len(lines) <= s.fineweb_line_punct_ratio:
        return "fineweb:line_punct_ratio"
    short = sum(len(line) <= s.fineweb_short_line_length for line in lines)
    if short / len(lines) >= s.fineweb_short_line_ratio:
        return "fineweb:short_line_ratio"
    _, duplicate_chars, total_chars = duplicate_stats(lines)
    if duplicate_chars / total_chars >= s.fineweb_dup_line_chars:
        return "fineweb:dup_line_chars"
    return None


# ----------------------------------------------------------------------------- PII

# FineWeb masked emails and public IPv4 addresses too (Penedo et al. 2024; datatrove's
# PIIFormatter, which cycles through a tuple of replacements). Here one fixed replacement
# each, which looks like the text it replaces, so the model still reads ordinary prose,
# and is reserved for exactly this use (example.com: RFC 2606; 0.0.0.0: "this host", not
# routable), so masking twice changes nothing.
EMAIL_PLACEHOLDER = "email@example.com"
IP_PLACEHOLDER = "0.0.0.0"
# At most 64 characters before the @ (RFC 5321's limit) keeps the scan linear on long
# runs like base64 "ab+cd+ef+...", where every + would start a new unbounded attempt.
_EMAIL = re.compile(r"\b[\w.%+-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                    r"[A-Za-z]{2,}\b")
# Four dotted numbers not inside a longer dotted number or word (1.2.3.4.5 is a version).
# The look-behind comes after the first digit so that the scan skips non-digits fast.
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}(?:\.\d{1,3}){3}(?!\w|\.\d)")


def mask_pii(text):
    """Email addresses -> email@example.com; public IPv4 addresses -> 0.0.0.0. Private,
    loopback, link-local and reserved addresses (192.168.1.1, 10.0.0.1, 127.0.0.1) say
    nothing about a person and stay; 999.1.1.1 is not an address and stays."""
    if "@" in text:
        text = _EMAIL.sub(EMAIL_PLACEHOLDER, text)
    return _IPV4.sub(_mask_public_ip, text)


def _mask_public_ip(match):
    try:
        address = ipaddress.IPv4Address(match.group())
    except ValueError:  # an octet over 255, or a leading zero
        return match.group()
    # is_global: outside IANA's special-purpose registry (private, loopback, link-local,
    # shared, documentation and reserved blocks)
    return IP_PLACEHOLDER if address.is_global else match.group()


# ----------------------------------------------------------------------------- dedup

@dataclass(frozen=True)
class DedupSignature:
    """What the main process needs to deduplicate one document: small and picklable."""
    exact_key: int     # exact_key(text): of the normalised text for web text
    band_keys: tuple   # one 64-bit key per MinHash band; empty when dedup_near is off


def dedup_signature(text, settings=DEFAULT_SETTINGS):
    """Pure: the same text gives the same signature in any process (no Python hash())."""
    band_keys = ()
    if settings.dedup_near:
        band_keys = minhash_band_keys(minhash(text, settings), settings.minhash_bands)
    return DedupSignature(exact_key(text), band_keys)


def exact_signature(text):
    """The signature of text that is not web text (code, books, notes): only a copy of the
    exact text is a duplicate, since there case and spacing carry meaning."""
    return DedupSignature(exact_key(text, normalised=False), ())


def normalise(text):
    """Case and whitespace differences do not make a different document."""
    return " ".join(text.lower().split())


def exact_key(text, normalised=True):
    """The hash that equal texts share: 64 bits of the normalised text, or with
    normalised=False 128 bits of the text as it is (lone surrogates from JSON included)."""
    if normalised:
        data, size = normalise(text).encode(), 8
    else:
        data, size = text.encode("utf-8", "surrogatepass"), 16
    return int.from_bytes(hashlib.blake2b(data, digest_size=size).digest(), "little")


_MIX = np.uint64(0x9E3779B97F4A7C15)  # an odd constant (2**64 / golden ratio) to mix bits


def minhash(text, settings=DEFAULT_SETTINGS):
    """MinHash signature (uint32, minhash_bands * minhash_rows values) of the set of
    minhash_ngram-word shingles of the lowercased words (split_words). Hash function i
    maps a 32-bit shingle hash x to the high half of (a_i * x + b_i) mod 2**64, with random
    64-bit a_i, b_i: the multiply-add-shift scheme (Dietzfelbinger 1996), pairwise
    independent like the textbook (a * x + b) mod p but without a division. The share of
    equal values in two signatures estimates the Jaccard similarity of the shingle sets."""
    words = split_words(text.lower())
    word_hashes = np.fromiter(map(zlib.crc32, map(str.encode, words)),
                              dtype=np.uint64, count=len(words))
    shingles = _shingle_hashes(word_hashes, settings.minhash_ngram)
    a, b = _minhash_parameters(settings.minhash_bands * settings.minhash_rows,
                               settings.minhash_seed)
    signature = np.full(len(a), np.iinfo(np.uint64).max, dtype=np.uint64)
    # 128 shingles at a time: the (128, 112) temporaries stay in cache and below the size
    # where malloc maps fresh pages for each one (RESULTS.md: MinHash in chunks), and a
    # very long page needs no more memory than a short one.
    for start in range(0, len(shingles), 128):
        chunk = shingles[start:start + 128, None]
        np.minimum(signature, ((chunk * a + b) >> np.uint64(32)).min(axis=0), out=signature)
    return signature.astype(np.uint32)


def _shingle_hashes(word_hashes, ngram):
    """32-bit hashes (in uint64) of every run of `ngram` words; a page with fewer words
    is one shingle of all of them."""
    n = min(ngram, len(word_hashes))
    if n == 0:
        return np.zeros(1, dtype=np.uint64)
    count = len(word_hashes) - n + 1
    keys = word_hashes[:count].copy()
    for offset in range(1, n):
        keys = keys * _NGRAM_MULTIPLIER + word_hashes[offset:offset + count]
    keys ^= keys >> np.uint64(29)
    return (keys * _MIX) >> np.uint64(32)  # the high half of the product mixes every bit


_minhash_parameter_cache = {}


def _minhash_parameters(count, seed):
    """(a, b) of the hash functions: fixed by the seed, so every worker agrees."""
    if (count, seed) not in _minhash_parameter_cache:
        rng = np.random.default_rng(seed)
        a, b = rng.integers(0, 2**64, size=(2, count), dtype=np.uint64)
        _minhash_parameter_cache[count, seed] = (a, b)
    return _minhash_parameter_cache[count, seed]


def minhash_band_keys(signature, bands):
    """One 64-bit key per band of consecutive signature values. Two documents collide in a
    band with probability s**rows for Jaccard similarity s, so with 14 bands of 8 a pair
    is caught with probability 1 - (1 - s**8)**14: 0.77 at s=0.75, 0.98 at s=0.85."""
    rows = signature.reshape(bands, -1).astype(np.uint64)
    keys = rows[:, 0].copy()
    for column in range(1, rows.shape[1]):
        keys = keys * _NGRAM_MULTIPLIER + rows[:, column]
    return tuple(keys.tolist())


class Deduplicator:
    """Remembers the documents kept so far in a run. Call check() in document order, so
    the first copy is the one kept, whatever the number of workers or tasks. Like FineWeb's
    LSH, a shared band is taken as a duplicate without a second check. Unlike FineWeb's
    clustering (datatrove's union-find over every matching pair), a dropped document is not
    remembered: in a chain A~B~C where only neighbours match, A is kept, B dropped and C
    kept, as C copies nothing in the dataset. Memory: a Python int in a set per band and
    document, about 14 * 60 bytes per document."""

    def __init__(self, settings=DEFAULT_SETTINGS, exact_reason="dedup:exact"):
        self.settings, self.exact_reason = settings, exact_reason
        self.exact_keys = set()
        self.band_keys = [set() for _ in range(settings.minhash_bands)]

    @classmethod
    def exact_only(cls):
        """For text that is not web text (signatures from exact_signature): an exact copy
        is dropped as "duplicate"."""
        return cls(dataclasses.replace(DEFAULT_SETTINGS, dedup_near=False), exact_reason="duplicate")

    def check(self, signature):
        """The drop reason if the document repeats one kept before; otherwise remember it
        as kept and return None."""
        if self.settings.dedup_exact and signature.exact_key in self.exact_keys:
            return self.exact_reason
        if self.settings.dedup_near and any(
                key in seen for key, seen in zip(signature.band_keys, self.band_keys)):
            return "dedup:near"
        self.exact_keys.add(signature.exact_key)
        for key, seen in zip(signature.band_keys, self.band_keys):
            seen.add(key)
        return None
