"""bench.py: measure a part of owngpt on this machine, the same way every time.

    python bench.py --what=webfilters --mb=50   # the web filters on one core, 50 MB of text
    python bench.py --help                      # every flag with its default

Each measurement is a mode: a function of the settings, listed in MODES by its --what name.
Times are CPU seconds of this process (time.process_time), so other load on a shared
machine does not count.
"""
import random
import sys
import time

import flags
import webfilters


# ----------------------------------------------------------------------------- webfilters

FUNCTION_WORDS = ("the of and to in is that for it with as was on be by at this are from "
                  "or have an they which one you were her all she there would their we "
                  "him been has when who will more no if out so said what up its about "
                  "into than them can only other new some could time these two may then").split()
CONTENT_WORDS = ("river city people water system history music family government school "
                 "market winter garden language story village country morning teacher "
                 "doctor science station island forest animal student company problem "
                 "building summer picture report window mountain kitchen library journey "
                 "season travel program research engine harbor farmer bridge "
                 "painting century evening answer quickly carefully important different "
                 "small large early ancient modern simple public local general possible "
                 "written found known built opened moved changed started followed "
                 "wanted reached carried believed remembered explained").split()


def english_like_documents(megabytes, seed=0):
    """Random pages of English-looking prose that pass every filter, so a benchmark runs
    every rule in full: sentences of function and content words, several per line, lines
    grouped in paragraphs."""
    rng = random.Random(seed)
    documents, size = [], 0
    while size < megabytes * 1_000_000:
        paragraphs = []
        for _ in range(rng.randint(3, 8)):
            lines = []
            for _ in range(rng.randint(1, 4)):
                sentences = []
                for _ in range(rng.randint(2, 5)):
                    words = [rng.choice(FUNCTION_WORDS) if rng.random() < 0.45
                             else rng.choice(CONTENT_WORDS) for _ in range(rng.randint(8, 20))]
                    sentences.append(" ".join(words).capitalize() + ".")
                lines.append(" ".join(sentences))
            paragraphs.append("\n".join(lines))
        documents.append("\n\n".join(paragraphs))
        size += len(documents[-1].encode())
    return documents


def bench_webfilters(settings):
    """Documents/s and MB/s of webfilters.filter_document plus dedup_signature on --mb
    megabytes of english_like_documents, in CPU seconds of this process."""
    documents = english_like_documents(settings["mb"])
    headers = {webfilters.LANGUAGE_HEADER: "eng"}
    deduplicator = webfilters.Deduplicator()
    filter_seconds = signature_seconds = 0.0
    kept = 0
    for document in documents:
        start = time.process_time()
        text, reason = webfilters.filter_document(document, headers)
        filter_seconds += time.process_time() - start
        if text is None:
            continue
        start = time.process_time()
        signature = webfilters.dedup_signature(text)
        signature_seconds += time.process_time() - start
        kept += deduplicator.check(signature) is None
    total_mb = sum(len(d.encode()) for d in documents) / 1e6
    seconds = filter_seconds + signature_seconds
    print(f"{len(documents)} documents, {total_mb:.1f} MB, {kept} kept, one core: "
          f"{len(documents) / seconds:.0f} documents/s, {total_mb / seconds:.2f} MB/s "
          f"(filters {filter_seconds:.1f} s, MinHash signatures {signature_seconds:.1f} s)")


# ----------------------------------------------------------------------------- command line

MODES = {"webfilters": bench_webfilters}
DEFAULTS = {"what": "webfilters", "mb": 50.0}
HELP = {"what": f"what to measure: {', '.join(MODES)}",
        "mb": "megabytes of generated text to measure on"}
CHECKS = {"what": flags.one_of(*MODES),
          "mb": lambda mb: None if mb > 0 else "a positive number of megabytes"}


def main(argv):
    settings = flags.parse(argv, DEFAULTS, HELP, CHECKS, program="bench.py")
    MODES[settings["what"]](settings)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except flags.UserError as error:
        print(f"bench.py: error: {error}", file=sys.stderr)
        sys.exit(1)
