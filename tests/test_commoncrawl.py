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
import random
import threading

import pytest

from helpers import bin_files, kept_documents, run_prepare, send_body
from owngpt import dataset, tokenizer
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


def warc_record(headers, body):
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"WARC/1.0\r\n{lines}\r\n".encode() + body + b"\r\n\r\n"


def conversion(number, url, language, text):
    body = text.encode()
    return warc_record({"WARC-Type": "conversion", "WARC-Target-URI": url,
                        "WARC-Date": f"2025-06-{number % 28 + 1:02d}T12:00:00Z",
                        "WARC-Record-ID": f"<urn:uuid:{number:08d}>",
                        "WARC-Identified-Content-Language": language,
                        "Content-Type": "text/plain", "Content-Length": len(body)}, body)


def wet_file(pages, first_number=1, filler_bytes=0):
    """A gzipped WET file: a warcinfo record (with filler_bytes of random text, to make the
    file longer than one 64 KiB download block), one gzip member per page, and after the
    third page a member cut short and a record whose header has no valid length."""
    filler = "".join(random.Random(0).choices("abcdefghij0123456789", k=filler_bytes)).encode()
    members = [gzip.compress(warc_record({"WARC-Type": "warcinfo", "Content-Length": len(filler) + 16},
                                         b"software: test\r\n" + filler))]
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
    (tmp_path / "fr.warc.wet.gz").write_bytes(b"".join(gzip.compress(conversion(n, url, language, text))
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
    body, then hang up) or "failing" (503 with Retry-After: 0, every time from then on)."""
    files, plans, log = {}, {}, []

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
