"""prepare.py on web text: WET files through the web filters, and Common Crawl streamed
from a fake crawl served by a real http.server on 127.0.0.1.

The WET files are made here, one gzip member per record as Common Crawl writes them:
good English pages, one page of each kind the filters drop, and records that cannot be
read (a gzip member cut short, a WARC header without a length). Every run is a real
`python prepare.py` subprocess; the shards are decoded to see what was kept.
"""
import gzip
import http.server
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
from collections import Counter

import pytest

import prepare
from helpers import (ROOT, bin_files, checkout, conversion, gzip_members, kept_documents, run_prepare, send_body,
                     warc_record, warcinfo)
from owngpt import dataset, tokenizer
from owngpt.flags import UserError
from owngpt.web import crawl, filters

GOOD = [
    """The town library reopened this spring after two years of careful repairs to its roof and walls.
Volunteers moved more than forty thousand books into temporary storage while the builders worked.
The reading room now has larger windows, so visitors can study in natural light for most of the day.
Children's stories have moved to the ground floor, next to a small garden where readings are held in summer.
The librarian said that the number of members has doubled since the doors opened again in April.""",
    """Bread dough needs time more than it needs effort, which surprises many people who bake for the first time.
Mix the flour, water, salt and yeast until no dry patches remain, then cover the bowl and leave it alone.
After an hour, stretch the dough and fold it over itself a few times to build strength in the gluten.
Repeat the folds twice more, shape a round loaf, and let it rise in a basket lined with a floured cloth.
Bake it in a very hot oven with steam for the first twenty minutes to get a crisp and shiny crust.""",
    """Migrating birds use several cues to find their way across thousands of kilometres each year.
Some species follow the position of the sun during the day and the pattern of the stars at night.
Others appear to sense the magnetic field of the earth, although scientists still debate how this works.
Young birds on their first journey often make mistakes that older birds with experience do not make.
Researchers attach tiny trackers to follow their routes, which has revealed stopover sites that need protection.""",
    """Our team spent the weekend repairing the old footbridge that crosses the stream behind the school.
Several planks had rotted through, and the handrail on the north side was loose enough to be dangerous.
We replaced the planks with treated oak, and a local carpenter showed the students how to fit the joints.
By Sunday afternoon the bridge was safe again, and the headteacher thanked everyone who had helped.
The parents' association has promised to paint it in the autumn before the wet weather arrives.""",
    """Learning a second language as an adult is slower than it is for a child, but it is far from impossible.
Adults can use their knowledge of grammar and their discipline to make steady progress every week.
The most useful habit is regular practice, even for fifteen minutes a day, rather than long sessions once a month.
Listening to podcasts, reading simple books and talking with patient friends all help new words to stick.
Mistakes are part of the process, and most native speakers are glad that someone is trying to learn.""",
    """The museum's new exhibition tells the story of the railway that once connected the valley villages.
Photographs from the early twentieth century show steam engines pulling carriages full of farm produce.
A restored signal box stands in the middle of the hall, and visitors are allowed to pull its heavy levers.
Recorded interviews with former drivers describe the long winter nights and the pride they took in their work.
The exhibition will remain open until the end of the year, and entry is free for schools and local residents.""",
    """Keeping a vegetable garden through a dry summer requires planning rather than constant watering.
Mulch spread thickly around the plants keeps moisture in the soil and stops weeds from taking hold.
Watering deeply twice a week encourages roots to grow downward, where the earth stays cool and damp.
Choosing varieties that tolerate heat, such as certain beans and squash, also reduces the work involved.
Collecting rain from the roof in large barrels gives a free supply that plants seem to prefer over tap water.""",
    """The city council voted on Tuesday to extend the cycle lanes along the river to the new business district.
Supporters argued that safer routes would encourage more people to leave their cars at home in the morning.
Some shop owners worried that removing parking spaces would reduce the number of customers who visit them.
The council agreed to study the effect on local trade for a year before deciding on any further changes.
Construction is expected to begin in the autumn and should be finished before the following summer.""",
]
JAVASCRIPT_LINE = "Please enable JavaScript in your browser to see the comments below."
COOKIE_LINE = "This website uses cookies to make sure you get the best experience."
WITH_BOILERPLATE = f"""The annual chess tournament at the community hall attracted players of every age this year.
{JAVASCRIPT_LINE}
The youngest competitor was only eight years old, and she won three of her five games against adults.
Organisers set up a separate room where beginners could learn the rules from experienced volunteers.
{COOKIE_LINE}
The final match lasted more than four hours and ended in a draw that the audience applauded loudly.
Next year the club hopes to invite teams from the neighbouring towns to make the event even larger."""
WITH_PII = """If you would like to join the walking group, please write to margaret.hill@gmail.com before Friday.
We meet every Saturday morning at the station car park and walk for about two hours along the coast.
The route changes each week, and the group leader posts the plan on the club website on Thursday evening.
Members who run the website asked us to mention that it moved to a new server at 93.184.216.34 last month.
The old address on the home network, 192.168.1.20, belonged to the router and is no longer used by anyone."""
MASKED_PII = WITH_PII.replace("margaret.hill@gmail.com", "email@example.com").replace("93.184.216.34", "0.0.0.0")

# (url, WET language header, text, what the filters do with it: "kept" or the drop reason)
PAGES = [
    ("https://news.example.org/library", "eng", GOOD[0], "kept"),
    ("https://www.bakery.example.net/bread", "eng", GOOD[1], "kept"),
    ("https://news.example.org/birds", "eng", GOOD[2], "kept"),
    ("https://school.example.com/bridge", "eng", GOOD[3], "kept"),
    ("https://copycat.example.com/library", "eng", GOOD[0].replace("\n", "\n\n  "), "dedup:exact"),
    ("https://languages.example.org/adults", "eng", GOOD[4], "kept"),
    ("https://news.example.org/museum", "eng", GOOD[5], "kept"),
    ("https://short.example.com/", "eng", "Thank you for visiting our page. See you soon!", "gopher_quality:word_count"),
    ("https://fr.example.org/port", "fra", """Le vieux port se trouve à l'embouchure d'une large rivière, et son histoire est écrite dans la pierre.
Les pêcheurs travaillent ces eaux depuis des siècles et vendent leur poisson sur la place du marché.
Au printemps, la rivière inonde les champs bas, c'est pourquoi les fermes sont sur les collines.
Un pont étroit relie les deux moitiés de la ville, et il est plus ancien que l'église voisine.
Les visiteurs arrivent souvent en train depuis la capitale, un voyage d'environ trois heures.""", "language:header"),
    ("https://spam.example.com/zyzzyva", "eng",
     "\n".join(["Buy the zyzzyva and the zyzzyva charm today."] * 30), "gopher_repetition:dup_line_fraction"),
    ("https://theme.example.com/demo", "eng", GOOD[6].replace(
        "\nWatering", "\nLorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\nWatering"),
     "c4:lorem_ipsum"),
    ("https://chess.example.org/tournament", "eng", WITH_BOILERPLATE, "kept"),
    ("https://code.example.com/snippet", "eng", GOOD[7].replace(
        "\nSome shop", "\nThe plan is stored as { \"lanes\": 4, \"length\": 12 } in the open data portal.\nSome shop"),
     "c4:curly_bracket"),
    ("https://walks.example.org/join", "eng", WITH_PII, "kept"),
    ("https://www.garden.example.net/summer", "eng", GOOD[6], "kept"),
    ("https://news.example.org/council", "eng", GOOD[7], "kept"),
    ("https://copycat.example.com/bread", "eng", GOOD[1].replace("very hot oven", "hot oven"), "dedup:near"),
]
KEPT_TEXTS = {GOOD[index] for index in range(8)} | {MASKED_PII, WITH_BOILERPLATE.replace(
    JAVASCRIPT_LINE + "\n", "").replace(COOKIE_LINE + "\n", "")}
DROPPED = {reason: 1 for *_, reason in PAGES if reason != "kept"}
UNREADABLE = {"bad_record:gzip": 1, "bad_record:warc_header": 1}  # the two damaged records


def wet_file(pages, first_number=1, filler_bytes=0):
    """A gzipped WET file: a warcinfo record (with filler_bytes of random text, to make the
    file longer than one 64 KiB download block), one gzip member per page, and after the
    third page a member cut short and a record whose header has no valid length."""
    filler = "".join(random.Random(0).choices("abcdefghij0123456789", k=filler_bytes)).encode()
    members = [gzip.compress(warcinfo(filler))]
    for number, (url, language, text, _) in enumerate(pages, start=first_number):
        members.append(gzip.compress(conversion(number, url, language, text)))
        if number == first_number + 2:
            lost = gzip.compress(conversion(999, "https://lost.example.org/", "eng", GOOD[2]))
            members.append(lost[:len(lost) // 2])
            members.append(gzip.compress(warc_record({"WARC-Type": "conversion", "Content-Length": "many"},
                                                     b"a header that does not say how long the body is")))
    return b"".join(members)


# ---------------------------------------------------------------------------------------
# The WET reader

def test_a_gzip_member_cut_short_costs_its_record_only():
    records = [conversion(number, f"https://example.org/{number}", "eng", f"page {number}") for number in range(4)]
    members = [gzip.compress(record) for record in records]
    data = members[0] + members[1][:30] + members[2] + members[3]
    blocks = [data[index:index + 50] for index in range(0, len(data), 50)]
    read = list(crawl.warc_records(blocks, gzipped=True))
    assert [item.reason if isinstance(item, crawl.Dropped) else item[1] for item in read] == [
        b"page 0", "bad_record:gzip", b"page 2", b"page 3"]


def test_a_file_ending_inside_a_gzip_member_counts_it_and_keeps_the_rest():
    members = [gzip.compress(conversion(number, "https://example.org/", "eng", f"page {number}"))
               for number in range(2)]
    read = list(crawl.warc_records([members[0] + members[1][:-5]], gzipped=True))
    assert [item.reason if isinstance(item, crawl.Dropped) else item[1] for item in read] == [b"page 0", "bad_record:gzip"]


def test_a_malformed_warc_header_is_skipped_up_to_the_next_record():
    good = conversion(1, "https://example.org/", "eng", "kept page")
    data = b"WARX/1.0 garbage\r\n\r\nmore garbage\r\n" + good + warc_record({"WARC-Type": "conversion"}, b"x") + good
    read = list(crawl.warc_records([data], gzipped=False))
    assert [item.reason if isinstance(item, crawl.Dropped) else item[1] for item in read] == [
        "bad_record:warc_header", b"kept page", "bad_record:warc_header", b"kept page"]


# ---------------------------------------------------------------------------------------
# A WET file through --source=files: the web filters, PII, metadata and the report

@pytest.fixture(scope="module")
def wet_dataset(tmp_path_factory):
    """The WET file prepared with the default (web) filters, a small BPE and docs.jsonl."""
    folder = tmp_path_factory.mktemp("wet")
    (folder / "pages.warc.wet.gz").write_bytes(wet_file(PAGES))
    run_prepare("--source=files", "--input=pages.warc.wet.gz", "--out_dir=out", "--vocab_size=300",
                "--keep_metadata=true", "--val_fraction=0.2", "--num_workers=2", cwd=folder)
    return folder / "out"


def test_web_filters_keep_the_good_pages_and_count_each_drop_under_its_reason(wet_dataset):
    meta = dataset.read_meta(wet_dataset)
    assert sorted(kept_documents(wet_dataset)) == sorted(KEPT_TEXTS)
    assert meta["dropped"] == {**DROPPED, **UNREADABLE}
    assert meta["documents"]["read"] == len(PAGES) + 2
    assert meta["documents"]["kept"] == len(KEPT_TEXTS)
    assert meta["filters"] == ["empty", *filters.SWITCHES]
    assert meta["web_filters"]["gopher_min_words"] == 50


def test_javascript_and_cookie_lines_go_and_pii_is_masked_in_the_shards(wet_dataset):
    shards_text = "\n".join(kept_documents(wet_dataset))
    assert "The annual chess tournament" in shards_text
    assert JAVASCRIPT_LINE not in shards_text and COOKIE_LINE not in shards_text
    assert "margaret.hill@gmail.com" not in shards_text and "93.184.216.34" not in shards_text
    assert "write to email@example.com before Friday" in shards_text
    assert "moved to a new server at 0.0.0.0 last month" in shards_text
    assert "192.168.1.20" in shards_text  # a private address says nothing about a person


def test_bpe_is_trained_on_the_filtered_text_only(wet_dataset, tmp_path):
    # The spam page repeats "zyzzyva" 60 times: unfiltered, BPE learns it as a word.
    (tmp_path / "pages.warc.wet.gz").write_bytes(wet_file(PAGES))
    run_prepare("--source=files", "--input=pages.warc.wet.gz", "--out_dir=unfiltered", "--vocab_size=300",
                "--filters=none", cwd=tmp_path)
    assert len(tokenizer.load_tokenizer(tmp_path / "unfiltered").encode(" zyzzyva")) == 1
    assert len(tokenizer.load_tokenizer(wet_dataset).encode(" zyzzyva")) > 1
    assert dataset.read_meta(tmp_path / "unfiltered")["dropped"] == UNREADABLE


def test_docs_jsonl_lists_every_kept_document_with_its_labels(wet_dataset):
    meta = dataset.read_meta(wet_dataset)
    lines = [json.loads(line) for line in (wet_dataset / "docs.jsonl").read_text().splitlines()]
    assert sorted(line["url"] for line in lines) == sorted(url for url, *_, kept in PAGES if kept == "kept")
    assert {line["language"] for line in lines} == {"eng"}
    assert all(line["date"].startswith("2025-06-") and line["id"].startswith("pages.warc.wet.gz:") for line in lines)
    for split in ("train", "val"):
        assert sum(line["tokens"] for line in lines if line["split"] == split) == meta["splits"][split]["tokens"]
        assert sum(line["split"] == split for line in lines) == meta["splits"][split]["documents"]


def test_report_shows_per_filter_drops_examples_languages_and_domains(wet_dataset):
    report = (wet_dataset / "report.md").read_text()
    read = len(PAGES) + 2
    assert f"### language: 1 ({1 / read:.1%})" in report
    assert f"### c4: 2 ({2 / read:.1%})" in report and "c4:curly_bracket 1, c4:lorem_ipsum 1." in report
    assert "Le vieux port se trouve à l'embouchure" in report  # the original text of a drop
    assert "Languages (the first of the WET header's): eng 10." in report
    assert "| news.example.org | 4 |" in report.split("| top domains | documents |")[1]
    assert "With 2 worker(s): filtering ran at" in report
    meta = dataset.read_meta(wet_dataset)
    assert set(meta["throughput"]) == {"filter", "shards", "total"}
    assert meta["throughput"]["filter"]["documents_per_s"] > 0 and meta["throughput"]["filter"]["mb_per_s"] > 0
    assert meta["top_domains"]["garden.example.net"] == 1  # www. is not a different site


def test_max_docs_stops_once_that_many_are_kept(tmp_path):
    (tmp_path / "pages.warc.wet.gz").write_bytes(wet_file(PAGES))
    run_prepare("--source=files", "--input=pages.warc.wet.gz", "--out_dir=out", "--tokenizer=byte",
                "--max_docs=3", cwd=tmp_path)
    assert sorted(kept_documents(tmp_path / "out")) == sorted(GOOD[:3])


def test_zero_documents_left_names_the_filter_that_took_them(tmp_path):
    french = [page for page in PAGES if page[1] == "fra"] * 2
    (tmp_path / "fr.warc.wet.gz").write_bytes(gzip_members(conversion(n, url, language, text)
                                                           for n, (url, language, text, _) in enumerate(french)))
    result = run_prepare("--source=files", "--input=fr.warc.wet.gz", "--tokenizer=byte", "--name=fr",
                         cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert ("no documents found: read 2 documents, dropped 2 language:header. The language filter "
            "dropped 2 of them") in result.stderr
    assert "--language=false" in result.stderr
    assert list((tmp_path / "data").iterdir()) == []


def test_filters_web_applies_the_web_filters_to_plain_text_files(tmp_path):
    german = ("Der alte Hafen liegt an der Mündung eines breiten Flusses, und seine Geschichte ist in "
              "Stein geschrieben. ") * 6
    (tmp_path / "in").mkdir()
    for name, text in [("a.txt", GOOD[0]), ("b.txt", GOOD[1]), ("c.txt", german), ("d.txt", WITH_PII)]:
        (tmp_path / "in" / name).write_text(text, encoding="utf-8")
    run_prepare("--source=files", "--input=in", "--filters=web", "--tokenizer=byte", "--out_dir=out", cwd=tmp_path)
    assert sorted(kept_documents(tmp_path / "out")) == sorted([GOOD[0], GOOD[1], MASKED_PII])
    assert dataset.read_meta(tmp_path / "out")["dropped"] == {"language:stop_words": 1}  # no header: stop words


def test_web_filter_flags_are_listed_and_checked(tmp_path):
    help_text = run_prepare("--help", cwd=tmp_path).stdout
    for name in filters.settings_flags()[0]:
        assert f"--{name}=" in help_text
    assert "--languages=eng" in help_text and "--gopher_min_words=50" in help_text
    typo = run_prepare("--gopher_min_word=10", cwd=tmp_path, check=False)
    assert "unknown flag --gopher_min_word; did you mean 'gopher_min_words'?" in typo.stderr
    bad = run_prepare("--gopher_min_words=many", cwd=tmp_path, check=False)
    assert "--gopher_min_words=many: expected an integer" in bad.stderr and bad.returncode == 1


# ---------------------------------------------------------------------------------------
# --source=commoncrawl against a fake crawl

CRAWL = "CC-MAIN-2099-01"
WET_PATHS = [f"crawl-data/{CRAWL}/segments/1/wet/CC-MAIN-0000{index}.warc.wet.gz" for index in range(2)]


class FakeCrawl(http.server.BaseHTTPRequestHandler):
    """Serves `files` (404 for other paths). `plans[path]` lists what the next requests
    get instead: an HTTP status, "broken" (the headers for the whole body, half of the
    body, then hang up), "failing" (503 with Retry-After: 0, every time from then on) or
    "stall" (half of the body, then `stalled` is set and the answer waits for `release`)."""
    files, plans, log = {}, {}, []
    stalled, release = threading.Event(), threading.Event()

    def do_GET(self):
        path = self.path.lstrip("/")
        self.log.append((path, self.headers.get("Range"), self.headers.get("User-Agent")))
        plan = self.plans.get(path, [])
        behaviour = plan[0] if plan == ["failing"] else plan.pop(0) if plan else "ok"
        if behaviour == "failing":
            self.send_response(503, "Slow Down")
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if isinstance(behaviour, int) or path not in self.files:
            self.send_error(behaviour if isinstance(behaviour, int) else 404)
            return
        body = self.files[path]
        if behaviour == "stall":
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.stalled.set()
            self.release.wait(timeout=120)
            self.close_connection = True
            return
        send_body(self, body, broken=behaviour == "broken")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def crawl_server():
    half = len(PAGES) // 2
    FakeCrawl.files = {
        "collinfo.json": json.dumps([{"id": CRAWL, "name": "June 2099"},
                                     {"id": "CC-MAIN-2098-52", "name": "December 2098"}]).encode(),
        f"crawl-data/{CRAWL}/wet.paths.gz": gzip.compress("\n".join(WET_PATHS).encode() + b"\n"),
        WET_PATHS[0]: wet_file(PAGES[:half], filler_bytes=400_000),
        WET_PATHS[1]: wet_file(PAGES[half:], first_number=half + 1),
        f"crawl-data/{TASKS_CRAWL}/wet.paths.gz": gzip.compress("\n".join(TASKS_WET_PATHS).encode() + b"\n"),
        **{path: wet_file(pages, first_number=10 * index) for index, (path, pages) in
           enumerate(zip(TASKS_WET_PATHS, TASKS_WET_FILES))},
    }
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeCrawl)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def crawl_flags(server, *extra):
    return ["--source=commoncrawl", "--wet_files=2", f"--cc_base_url={server}/",
            f"--cc_index_url={server}/collinfo.json", "--tokenizer=byte", "--val_fraction=0.2", *extra]


def requests_since(start):
    return FakeCrawl.log[start:]


@pytest.fixture(scope="module")
def crawl_reference(crawl_server, tmp_path_factory):
    """The fake crawl prepared with nothing going wrong, with two workers."""
    folder = tmp_path_factory.mktemp("reference") / "web"
    FakeCrawl.plans = {}
    start = len(FakeCrawl.log)
    run_prepare(*crawl_flags(crawl_server, f"--out_dir={folder}", "--num_workers=2"), cwd=folder.parent)
    return folder, requests_since(start)


@pytest.mark.slow
def test_commoncrawl_streams_the_latest_crawls_wet_files_through_the_filters(crawl_reference):
    folder, requests = crawl_reference
    assert [path for path, _, _ in requests] == ["collinfo.json", f"crawl-data/{CRAWL}/wet.paths.gz", *WET_PATHS]
    assert all(agent.startswith("owngpt") for _, _, agent in requests)
    meta = dataset.read_meta(folder)
    assert sorted(kept_documents(folder)) == sorted(KEPT_TEXTS)
    assert meta["dropped"] == {**DROPPED, "bad_record:gzip": 2, "bad_record:warc_header": 2}
    assert meta["sources"][0]["crawl"] == CRAWL and meta["sources"][0]["wet_files"] == WET_PATHS
    assert sorted(path.name for path in folder.parent.iterdir()) == ["web"]  # no build state left
    assert not (folder / "filtered").exists()


@pytest.mark.slow
def test_a_503_is_retried_and_a_broken_transfer_resumes_where_it_stopped(crawl_server, crawl_reference, tmp_path):
    reference, _ = crawl_reference
    FakeCrawl.plans = {WET_PATHS[0]: ["broken"], WET_PATHS[1]: [503]}
    start = len(FakeCrawl.log)
    result = run_prepare(*crawl_flags(crawl_server, "--out_dir=web", "--num_workers=1"), cwd=tmp_path)
    wet_requests = [(path, byte_range) for path, byte_range, _ in requests_since(start) if path in WET_PATHS]
    (_, first_range), (_, resumed_range), (_, _), (_, second_file_range) = wet_requests
    assert first_range is None and second_file_range is None
    resumed_at = int(resumed_range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= len(FakeCrawl.files[WET_PATHS[0]]) // 2
    assert "answered 503 Service Unavailable; retrying in 1 s" in result.stderr
    assert bin_files(tmp_path / "web") == bin_files(reference)  # nothing lost, nothing twice


@pytest.mark.slow
def test_a_rerun_after_a_failed_run_goes_on_with_the_next_wet_file(crawl_server, crawl_reference, tmp_path):
    reference, _ = crawl_reference
    FakeCrawl.plans = {WET_PATHS[1]: ["failing"]}
    failed = run_prepare(*crawl_flags(crawl_server, "--name=web"), cwd=tmp_path, check=False)
    assert failed.returncode == 1
    assert f"download failed after {crawl.DOWNLOAD_ATTEMPTS} tries" in failed.stderr
    assert "answered 503 Slow Down" in failed.stderr
    assert "1 of the 2 WET files of this task are filtered and kept in" in failed.stderr
    assert "run the same command again to go on with the others" in failed.stderr
    assert not (tmp_path / "data" / "web").exists()
    parts = tmp_path / "data" / ".web.partial" / "parts"
    assert sorted(path.name for path in parts.iterdir()) == ["manifest.json", "part_000000.jsonl"]

    FakeCrawl.plans = {}
    start = len(FakeCrawl.log)
    resumed = run_prepare(*crawl_flags(crawl_server, "--name=web"), cwd=tmp_path)
    assert [path for path, _, _ in requests_since(start) if path in WET_PATHS] == WET_PATHS[1:]
    assert "1 of this task's 2 parts are in" in resumed.stderr
    assert bin_files(tmp_path / "data" / "web") == bin_files(reference)
    assert dataset.read_meta(tmp_path / "data" / "web")["dropped"] == dataset.read_meta(reference)["dropped"]
    assert sorted(path.name for path in (tmp_path / "data").iterdir()) == ["web"]


def test_the_url_source_reads_a_wet_file_with_the_web_filters(crawl_server, tmp_path):
    FakeCrawl.plans = {}
    run_prepare("--source=url", f"--url={crawl_server}/{WET_PATHS[1]}", "--tokenizer=byte", "--out_dir=out",
                cwd=tmp_path)
    second_half = PAGES[len(PAGES) // 2:]  # alone, its copy of a page in the first half is new
    dropped = {reason: 1 for *_, reason in second_half if reason not in ("kept", "dedup:near")}
    assert len(kept_documents(tmp_path / "out")) == len(second_half) - len(dropped)
    assert dataset.read_meta(tmp_path / "out")["dropped"] == {**dropped, **UNREADABLE}


def test_a_crawl_id_that_does_not_exist_fails_saying_where_to_find_valid_ones(crawl_server, tmp_path):
    result = run_prepare(*crawl_flags(crawl_server, "--crawl=CC-MAIN-2099-02"), cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert "--crawl=CC-MAIN-2099-02: Common Crawl has no crawl with that id" in result.stderr
    assert f"The newest crawls are {CRAWL}, CC-MAIN-2098-52; the closest to yours is {CRAWL}." in result.stderr
    assert f"{crawl_server}/collinfo.json" in result.stderr and "commoncrawl.org/get-started" in result.stderr
    assert not (tmp_path / "data").exists() or list((tmp_path / "data").iterdir()) == []


# ---------------------------------------------------------------------------------------
# Stage one as several tasks (--task, --tasks), then --merge, against one machine

CHAIN_A = """The harbour committee met on Monday evening to discuss the future of the old fish market by the quay.
Several members argued that the building should be restored and opened again as a covered market for local farmers.
Others said the cost of repairing the roof and the sea wall would be far too high for a town of this size.
A surveyor told the meeting that the timber frame was still sound, although the brick walls needed careful work.
The mayor suggested that the town apply for a heritage grant, which could pay for half of the repairs.
Fishermen who still land their catch at the quay asked that any new plan keep space for their boats and nets.
A local school offered to help record the history of the market, with interviews of people who worked there.
The committee agreed to publish the surveyor's report and to hold a public meeting in the town hall next month.
Residents will be able to see drawings of the proposed changes and to leave comments before any decision is made.
Most people at the meeting seemed pleased that the market might have a future after standing empty for ten years."""


def with_word(text, line_numbers, word):
    """text with the middle word of each of these lines replaced by word."""
    lines = text.split("\n")
    for number in line_numbers:
        words = lines[number].split(" ")
        words[len(words) // 2] = word
        lines[number] = " ".join(words)
    return "\n".join(lines)


# B is A with two lines changed, C is B with two other lines changed: A~B and B~C share a
# MinHash band, A and C do not (checked below). Deduplication in file order keeps A, drops
# B as A's near copy, and keeps C, since B was dropped: a union of the pairs would drop C.
CHAIN_B = with_word(CHAIN_A, [0, 1], "blue")
CHAIN_C = with_word(CHAIN_B, [8, 9], "green")
TASKS_CRAWL = "CC-MAIN-2099-05"
PAGE = {reason: (url, language, text, reason) for url, language, text, reason in PAGES if reason != "kept"}
TASKS_WET_FILES = [  # with --tasks=3, files 0, 1 and 2 (A, B and C) are each another task's
    [PAGES[0], ("https://harbour.example.org/market", "eng", CHAIN_A, "kept"), PAGE["gopher_quality:word_count"],
     PAGES[1]],
    [("https://copy.example.org/market", "eng", CHAIN_B, "dedup:near"), PAGE["dedup:exact"], PAGES[2]],
    [("https://other.example.org/market", "eng", CHAIN_C, "kept"), PAGE["dedup:near"], PAGES[3],
     PAGE["language:header"]],
    [PAGES[5], ("https://again.example.org/birds", "eng", GOOD[2], "dedup:exact"),
     PAGE["gopher_repetition:dup_line_fraction"]],
    [PAGES[6], PAGES[13], PAGES[14], PAGES[15]],
]
TASKS_WET_PATHS = [f"crawl-data/{TASKS_CRAWL}/segments/2/wet/CC-MAIN-1000{index}.warc.wet.gz"
                   for index in range(len(TASKS_WET_FILES))]


def tasks_flags(server, *extra):
    return ["--source=commoncrawl", f"--crawl={TASKS_CRAWL}", f"--wet_files={len(TASKS_WET_PATHS)}",
            f"--cc_base_url={server}/", f"--cc_index_url={server}/collinfo.json", "--vocab_size=300",
            "--val_fraction=0.2", "--num_workers=1", *extra]


def start_prepare(*flags, cwd):
    """prepare.py started in its own process group (a scheduler stops a task's workers with it)."""
    return subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), *flags], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finished(process):
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, f"prepare.py failed:\n{stderr}"
    return stdout


def dataset_files(folder):
    """What must be the same, byte for byte, however the parts were made: the shards, the
    tokenizer, report.md up to its timings, and meta.json less its timings and flags."""
    meta = dataset.read_meta(folder)
    for timed in ("timings_s", "throughput", "settings"):
        meta.pop(timed)
    report = (folder / "report.md").read_text().split("## Timings")[0]
    return {**bin_files(folder), "report.md": report, "meta.json": meta}


@pytest.fixture(scope="module")
def one_machine(crawl_server, tmp_path_factory):
    """The tasks' crawl prepared on one machine: no --task, no --tasks."""
    FakeCrawl.plans = {}
    folder = tmp_path_factory.mktemp("one_machine") / "web"
    run_prepare(*tasks_flags(crawl_server, f"--out_dir={folder}"), cwd=folder.parent)
    return folder


def test_exact_and_near_copies_go_across_files_and_a_chain_keeps_its_first_and_last(one_machine):
    band_keys = {name: set(enumerate(filters.dedup_signature(text).band_keys))
                 for name, text in (("A", CHAIN_A), ("B", CHAIN_B), ("C", CHAIN_C))}
    assert band_keys["A"] & band_keys["B"] and band_keys["B"] & band_keys["C"]
    assert not band_keys["A"] & band_keys["C"]
    pages = [page for pages in TASKS_WET_FILES for page in pages]
    kept = [text for _, _, text, reason in pages if reason == "kept"]
    assert sorted(kept_documents(one_machine)) == sorted(MASKED_PII if text == WITH_PII else text for text in kept)
    dropped = Counter(reason for *_, reason in pages if reason != "kept")
    unreadable = {reason: count * len(TASKS_WET_FILES) for reason, count in UNREADABLE.items()}
    assert dataset.read_meta(one_machine)["dropped"] == {**dropped, **unreadable}
    assert dropped["dedup:near"] == 2 and dropped["dedup:exact"] == 2


@pytest.mark.slow
def test_three_tasks_in_reverse_order_or_two_tasks_then_merge_give_the_one_machine_dataset(
        crawl_server, one_machine, tmp_path):
    FakeCrawl.plans = {}
    shared = tmp_path / "shared_parts"
    three = [start_prepare(*tasks_flags(crawl_server, f"--parts={shared}", f"--task={task}", "--tasks=3"),
                           cwd=tmp_path) for task in (2, 1, 0)]
    for task in three:
        assert "once every task is done, run the same command with --merge=true" in finished(task)
    assert sorted(path.name for path in shared.glob("part_*")) == [f"part_{i:06d}.jsonl" for i in range(5)]
    run_prepare(*tasks_flags(crawl_server, f"--parts={shared}", "--merge=true", "--out_dir=three/web"), cwd=tmp_path)
    assert dataset_files(tmp_path / "three" / "web") == dataset_files(one_machine)
    assert shared.exists()  # a --parts folder is kept: another merge may read it

    for task in (0, 1):  # the default parts folder, in the dataset's build folder
        run_prepare(*tasks_flags(crawl_server, "--name=web", f"--task={task}", "--tasks=2"), cwd=tmp_path)
    run_prepare(*tasks_flags(crawl_server, "--name=web", "--merge=true"), cwd=tmp_path)
    assert dataset_files(tmp_path / "data" / "web") == dataset_files(one_machine)
    assert sorted(path.name for path in (tmp_path / "data").iterdir()) == ["web"]


@pytest.mark.slow
def test_a_task_killed_mid_file_and_run_again_redoes_only_that_file(crawl_server, one_machine, tmp_path):
    FakeCrawl.plans = {TASKS_WET_PATHS[3]: ["stall"]}  # task 1 of 2 reads files 1 and 3
    FakeCrawl.stalled.clear()
    FakeCrawl.release.clear()
    parts = tmp_path / "parts"
    flags = tasks_flags(crawl_server, f"--parts={parts}", "--out_dir=web")
    task = start_prepare(*flags, "--task=1", "--tasks=2", cwd=tmp_path)
    try:
        assert FakeCrawl.stalled.wait(timeout=120), "task 1 never reached its second file"
        os.killpg(task.pid, signal.SIGKILL)  # halfway through file 3, as a preemption would
        task.wait(timeout=60)
    finally:
        FakeCrawl.release.set()
    first_part = parts / "part_000001.jsonl"
    before = first_part.read_bytes(), first_part.stat().st_mtime_ns
    assert not (parts / "part_000003.jsonl").exists() and list(parts.glob(".part_000003.jsonl.*.tmp"))

    rerun = run_prepare(*flags, "--task=1", "--tasks=2", cwd=tmp_path)
    assert "1 of this task's 2 parts are in" in rerun.stderr
    assert (first_part.read_bytes(), first_part.stat().st_mtime_ns) == before
    assert not list(parts.glob(".*.tmp"))  # what the killed task was writing is gone
    run_prepare(*flags, "--task=0", "--tasks=2", cwd=tmp_path)
    run_prepare(*flags, "--merge=true", cwd=tmp_path)
    assert dataset_files(tmp_path / "web") == dataset_files(one_machine)


def test_merge_names_the_missing_parts_in_one_line(crawl_server, tmp_path):
    FakeCrawl.plans = {}
    flags = tasks_flags(crawl_server, f"--parts={tmp_path / 'parts'}", "--tokenizer=byte", "--out_dir=web")
    nothing = run_prepare(*flags, "--merge=true", cwd=tmp_path, check=False)
    assert nothing.returncode == 1
    assert nothing.stderr.endswith("holds no parts: run the stage-one tasks first (the same command with --task "
                                   "and --tasks, without --merge)\n")
    run_prepare(*flags, "--task=0", "--tasks=1", cwd=tmp_path)
    (tmp_path / "parts" / "part_000003.jsonl").unlink()
    result = run_prepare(*flags, "--merge=true", cwd=tmp_path, check=False)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert f"1 of 5 parts are missing from {tmp_path / 'parts'}: part_000003.jsonl;" in result.stderr
    assert not (tmp_path / "web").exists()


def test_parts_made_with_other_settings_are_refused_naming_the_setting(crawl_server, tmp_path):
    FakeCrawl.plans = {}
    flags = tasks_flags(crawl_server, f"--parts={tmp_path / 'parts'}", "--tokenizer=byte")
    run_prepare(*flags, "--task=0", "--tasks=5", cwd=tmp_path)
    result = run_prepare(*flags, "--gopher_min_words=20", "--task=1", "--tasks=5", cwd=tmp_path, check=False)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert "holds parts made with other settings (--gopher_min_words=50 there, 20 here)" in result.stderr


def test_latest_is_resolved_once_and_every_later_task_reads_the_same_crawl(crawl_server, tmp_path):
    FakeCrawl.plans = {}
    flags = ["--source=commoncrawl", "--crawl=latest", "--wet_files=2", f"--cc_base_url={crawl_server}/",
             f"--cc_index_url={crawl_server}/collinfo.json", f"--parts={tmp_path / 'parts'}", "--tasks=2"]
    run_prepare(*flags, "--task=0", cwd=tmp_path)
    listing = FakeCrawl.files["collinfo.json"]
    FakeCrawl.files["collinfo.json"] = json.dumps([{"id": TASKS_CRAWL}, {"id": CRAWL}]).encode()  # a new crawl
    try:
        start = len(FakeCrawl.log)
        run_prepare(*flags, "--task=1", cwd=tmp_path)
    finally:
        FakeCrawl.files["collinfo.json"] = listing
    assert [path for path, _, _ in requests_since(start)] == [f"crawl-data/{CRAWL}/wet.paths.gz", WET_PATHS[1]]
    header = json.loads((tmp_path / "parts" / "part_000001.jsonl").read_text().splitlines()[0])
    assert header["name"] == WET_PATHS[1] and header["fingerprint"]["crawl"] == CRAWL


@pytest.mark.parametrize("flags, environment, expected", [
    ([], {}, None),  # one machine: every part, then the merge
    (["--task=2", "--tasks=3"], {}, (2, 3)),
    ([], {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "10"}, (4, 10)),
    (["--tasks=8"], {"JOB_COMPLETION_INDEX": "7"}, (7, 8)),
    (["--task=1", "--tasks=2"], {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "10"}, (1, 2)),
    (["--merge=true"], {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "10"}, None),
    (["--task=3", "--tasks=3"], {}, "--task=3: expected a task index from 0 to 2 (--tasks=3)"),
    ([], {"SLURM_ARRAY_TASK_ID": "10", "SLURM_ARRAY_TASK_COUNT": "10"},
     "$SLURM_ARRAY_TASK_ID=10: expected a task index from 0 to 9 (--tasks=10); a Slurm array counts from 0"),
    (["--task=1"], {}, "--task=1: how many tasks share the WET files? Give --tasks=N"),
    ([], {"JOB_COMPLETION_INDEX": "3"}, "$JOB_COMPLETION_INDEX=3: how many tasks share the WET files?"),
    (["--tasks=4"], {}, "--tasks=4: which task is this? Give --task=K, K from 0 to 3"),
])
def test_task_and_tasks_come_from_the_flags_or_the_schedulers_environment(flags, environment, expected):
    settings = prepare.read_settings(["--source=commoncrawl", *flags])
    if isinstance(expected, str):
        with pytest.raises(UserError) as error:
            prepare.task_of(settings, environment)
        assert str(error.value).startswith(expected) and "\n" not in str(error.value)
    else:
        assert prepare.task_of(settings, environment) == expected


def test_merge_and_tasks_do_not_mix_and_go_only_with_commoncrawl():
    with pytest.raises(UserError, match="--merge runs on its own once the tasks are done"):
        prepare.read_settings(["--source=commoncrawl", "--merge=true", "--tasks=2"])
    with pytest.raises(UserError, match="--task, --tasks, --merge and --parts go with --source=commoncrawl"):
        prepare.read_settings(["--tasks=2", "--task=0"])


@pytest.mark.slow
def test_under_slurm_the_array_and_merge_make_the_one_machine_dataset_and_a_cancelled_task_redoes_only_its_files(
        slurm, crawl_server, one_machine, tmp_path):
    # launch/prepare_slurm.sbatch as shipped, in a clone, with 2 tasks: task 1 (files 1 and 3)
    # is cancelled halfway through file 3, and the merge with it; submitted again, the tasks
    # redo file 3 alone, and the merge makes the dataset the one machine made
    clone, parts, web = checkout(tmp_path / "owngpt"), tmp_path / "parts", tmp_path / "web"
    flags = tasks_flags(crawl_server, f"--parts={parts}", f"--out_dir={web}")

    def submit():
        submitted = subprocess.run(["bash", "launch/prepare_slurm.sbatch", "2", *flags], cwd=clone, capture_output=True,
                                   text=True, timeout=120, env=slurm.env)
        assert submitted.returncode == 0, submitted.stderr
        return re.fullmatch(r"stage one: job array (\d+) \(2 tasks\); the merge: job (\d+), once every task has "
                            r"succeeded\n", submitted.stdout).groups()

    FakeCrawl.plans = {TASKS_WET_PATHS[3]: ["stall"]}
    FakeCrawl.stalled.clear()
    FakeCrawl.release.clear()
    array, merge = submit()
    try:
        assert FakeCrawl.stalled.wait(timeout=300), "task 1 never reached its second file"
        slurm.run("scancel", f"{array}_1")
        slurm.wait_for_end(array)
    finally:
        FakeCrawl.release.set()
    ended = slurm.wait_for_end(f"{array},{merge}")
    print(f"first submission: array job {array}, merge job {merge}: {ended}")
    assert ended == {f"{array}_0": ("COMPLETED", "None"),
                     f"{array}_1": ("CANCELLED", "None"),
                     merge: ("CANCELLED", "DependencyNeverSatisfied")}
    assert sorted(path.name for path in parts.glob("part_*")) == [f"part_{i:06d}.jsonl" for i in (0, 1, 2, 4)]
    first_part = parts / "part_000001.jsonl"
    before, start = first_part.stat().st_mtime_ns, len(FakeCrawl.log)

    array, merge = submit()
    ended = slurm.wait_for_end(f"{array},{merge}")
    print(f"second submission: array job {array}, merge job {merge}: {ended}")
    assert set(ended.values()) == {("COMPLETED", "None")}
    assert [path for path, _, _ in requests_since(start) if path in TASKS_WET_PATHS] == [TASKS_WET_PATHS[3]]
    assert "1 of this task's 2 parts are in" in (clone / "logs" / f"owngpt-prepare_{array}_1.log").read_text()
    assert first_part.stat().st_mtime_ns == before
    merged = dataset_files(web)
    print(f"the merged dataset's files equal the one machine's, byte for byte: {sorted(merged)}")
    assert merged == dataset_files(one_machine)
