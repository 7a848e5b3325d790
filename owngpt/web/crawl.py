"""crawl.py: web text in: HTTP downloads that survive a bad network, Common Crawl's listings,
and WARC/WET files read record by record as their bytes arrive.

prepare.py's url and commoncrawl sources, and any .warc.wet(.gz) file, come through here:

    blocks = crawl.remote_blocks(url)               # bytes as they arrive; retries, resumes
    for record in crawl.warc_records(blocks, gzipped=url.endswith(".gz")):
        if isinstance(record, crawl.Dropped):      # a damaged or cut-off record
            print("skipped:", record.reason)
        else:
            headers, body = record                    # WARC headers (dict), body (bytes)

    crawl_id, listing, paths = crawl.wet_file_urls("latest", 2, "https://data.commoncrawl.org/",
                                                     "https://index.commoncrawl.org/collinfo.json")
    crawl.download(url, Path("downloads") / crawl.download_name(url))

A download that breaks goes on with a Range request where it stopped, and a server
error is retried with backoff; a gzip member that is damaged costs only its own records.
Errors that retrying will not fix are WebTextError, a flags.UserError: the scripts print
them as one line.
"""
import difflib
import gzip
import hashlib
import itertools
import json
import os
import posixpath
import re
import shutil
import sys
import time
import urllib.parse
import zlib
from dataclasses import dataclass

import requests

from owngpt.flags import UserError


class WebTextError(UserError):
    """A download, listing or crawl id that cannot be used: the message says what was found."""


@dataclass(frozen=True)
class Dropped:
    """A record that could not be read, in place of the record: its drop reason, such as
    "bad_record:gzip", is counted like a filter's."""
    reason: str


# ----------------------------------------------------------------------------------------
# WARC and WET files: gzip members, then records

def file_blocks(path, block_size=1 << 20):
    with open(path, "rb") as stream:
        while block := stream.read(block_size):
            yield block


GZIP_MAGIC = b"\x1f\x8b\x08"  # a gzip member's first bytes: ID1, ID2, deflate
MEMBER_END, MEMBER_BAD = "member end", "member bad"  # markers among gunzip_members' bytes
RESCAN_LIMIT = 1 << 20  # compressed bytes of a member kept to look for the next one in
UNCHECKED_LIMIT = 1 << 25  # decompressed bytes parsed before their member's CRC is checked


def gunzip_members(blocks):
    """Decompresses concatenated gzip members as they arrive. Yields decompressed bytes,
    MEMBER_END after each member whose CRC checked, and MEMBER_BAD for a member that is
    damaged or cut short; decoding then starts again at the next gzip header. Common
    Crawl gzips every record as its own member, so a damaged member costs one record."""
    decoder, member = zlib.decompressobj(wbits=31), bytearray()  # member: its compressed bytes
    searching, carry = False, b""  # after a damaged member: skip to the next gzip header
    for block in itertools.chain(blocks, [None]):  # None: the end of the stream
        todo = carry + block if block is not None else b""
        carry = b""
        if searching:
            todo, carry, searching = _from_next_member(todo)
        while todo:
            if len(member) < RESCAN_LIMIT:
                member += todo
            try:
                output = decoder.decompress(todo)
            except zlib.error:
                yield MEMBER_BAD
                todo, carry, searching = _from_next_member(member[1:] if len(member) < RESCAN_LIMIT else todo)
                decoder, member = zlib.decompressobj(wbits=31), bytearray()
                continue
            if output:
                yield output
            todo = b""
            if decoder.eof:
                yield MEMBER_END
                todo = decoder.unused_data
                decoder, member = zlib.decompressobj(wbits=31), bytearray()
        if block is None and member:  # the stream ended inside a member
            yield MEMBER_BAD
            todo, _, _ = _from_next_member(member[1:])
            if todo:  # a later member hides in what the cut one swallowed
                yield from gunzip_members([todo])


def _from_next_member(data):
    """(data from the next gzip header on, bytes to carry to the next block, still searching)."""
    start = data.find(GZIP_MAGIC)
    if start == -1:  # a header may begin in the last two bytes
        return b"", bytes(data[-(len(GZIP_MAGIC) - 1):]), True
    return bytes(data[start:]), b"", False


def warc_records(blocks, gzipped):
    """(headers, body bytes) for each record of a WARC file read in blocks of bytes, or
    Dropped(reason) for a record that is skipped: "bad_record:gzip" (a damaged
    gzip member), "bad_record:warc_header" (no 'WARC/' line or no valid Content-Length),
    "bad_record:truncated" (the file ends inside it). Records of a gzip member are given
    out once the member's CRC has checked, so a damaged member gives no garbled record."""
    buffer = WarcBuffer()
    if not gzipped:
        for block in blocks:
            buffer.feed(block)
            yield from buffer.records()
    else:
        for piece in gunzip_members(blocks):
            if piece is MEMBER_BAD:
                buffer.clear()
                yield Dropped("bad_record:gzip")
                continue
            if piece is not MEMBER_END:
                buffer.feed(piece)
            if piece is MEMBER_END or len(buffer) > UNCHECKED_LIMIT:  # one huge member: no waiting
                yield from buffer.records()
    yield from buffer.records(at_end=True)


class WarcBuffer:
    """Bytes of a WARC file not yet cut into records. A record is a 'WARC/1.0' line,
    'Name: value' header lines, a blank line, Content-Length bytes of body; blank lines
    separate records. A malformed record is skipped up to the next line that starts
    with 'WARC/'."""
    HEADER_END = re.compile(rb"\r?\n\r?\n")
    MAX_HEADER = 1 << 16

    def __init__(self):
        self.clear()

    def __len__(self):
        return len(self.data) - self.start

    def clear(self):
        self.data, self.start, self.skipping = bytearray(), 0, False

    def feed(self, data):
        if self.start > len(self.data) // 2:  # drop what has been read, now and then
            del self.data[:self.start]
            self.start = 0
        self.data += data

    def records(self, at_end=False):
        """The complete records buffered; at_end: the rest is a cut-off record."""
        data = self.data
        while True:
            if self.skipping and not self._skip_to_next_record(at_end):
                return
            while self.start < len(data) and data[self.start] in b"\r\n":
                self.start += 1
            if self.start == len(data):
                return
            if not data.startswith(b"WARC/", self.start):
                if not at_end and len(self) < 5 and b"WARC/".startswith(data[self.start:]):
                    return  # the start of a record, the rest on its way
                self.skipping = True
                yield Dropped("bad_record:warc_header")
                continue
            header_end = self.HEADER_END.search(data, self.start, self.start + self.MAX_HEADER)
            if header_end is None:
                if len(self) > self.MAX_HEADER:
                    self.skipping = True
                    yield Dropped("bad_record:warc_header")
                    continue
                if at_end:
                    self.clear()
                    yield Dropped("bad_record:truncated")
                return
            headers = {}
            for line in bytes(data[self.start:header_end.start()]).split(b"\n")[1:]:
                name, _, value = line.decode("utf-8", errors="replace").partition(":")
                headers[name.strip()] = value.strip()
            length = headers.get("Content-Length", "")
            if not length.isdigit():
                self.skipping = True
                yield Dropped("bad_record:warc_header")
                continue
            body_end = header_end.end() + int(length)
            if body_end > len(data):
                if at_end:
                    self.clear()
                    yield Dropped("bad_record:truncated")
                return
            body = bytes(data[header_end.end():body_end])
            self.start = body_end
            yield headers, body

    def _skip_to_next_record(self, at_end):
        """Drops bytes up to the next line that starts with 'WARC/'; False when there is
        none yet (the last bytes stay: they may be the start of one)."""
        found = self.data.find(b"\nWARC/", self.start)
        if found == -1:
            self.start = len(self.data) if at_end else max(self.start, len(self.data) - 5)
            return False
        self.start, self.skipping = found + 1, False
        return True


# ----------------------------------------------------------------------------------------
# Downloads (the url and commoncrawl sources)

DOWNLOAD_ATTEMPTS = 5  # tries in a row that make no progress before giving up
RETRY_STATUSES = {429, 500, 502, 503, 504}  # 503 is also S3's "SlowDown"
TIMEOUT_S = (10, 60)  # (connect, between bytes)
# Reads of 64 KiB: when a transfer breaks, requests drops the block being read, so small
# blocks keep most of what arrived for the Range request that resumes it.
DOWNLOAD_BLOCK = 1 << 16
# Common Crawl asks crawlers of its data to say who they are.
USER_AGENT = f"owngpt-prepare/1.0 (an educational GPT trainer; python-requests/{requests.__version__})"


class RetryableError(Exception):
    """A failure worth another try: the network, a server error, a cut-off transfer."""

    def __init__(self, message, wait_s=None):
        super().__init__(message)
        self.wait_s = wait_s  # what the server asked for in Retry-After, if it did


class RemoteError(WebTextError):
    """A server's answer that trying again will not change (404, 403, ...)."""

    def __init__(self, url, status, reason):
        super().__init__(f"download failed: {url} answered {status} {reason}")
        self.status = status


def remote_blocks(url, offset=0):
    """The bytes of url from offset on, in blocks as they arrive. A broken transfer goes
    on with a Range request from the first byte not yet given (a server that ignores
    Range sends the file again and the bytes already given are skipped), so the blocks
    join up exactly. Tries that bring no new byte are retried after the server's
    Retry-After or else 1, 2, 4, ... s, and after DOWNLOAD_ATTEMPTS in a row it gives up."""
    failures = 0
    while True:
        progressed = False
        try:
            for block in response_blocks(url, offset):
                offset += len(block)
                progressed = True
                yield block
            return
        except RetryableError as error:
            failures = 0 if progressed else failures + 1
            if failures >= DOWNLOAD_ATTEMPTS:
                raise WebTextError(f"download failed after {DOWNLOAD_ATTEMPTS} tries: {error}") from None
            wait_s = 0 if progressed else error.wait_s if error.wait_s is not None else 2 ** (failures - 1)
            resume = f" from byte {offset:,}" if offset else ""
            print(f"download: {error}; retrying in {wait_s} s{resume}", file=sys.stderr)
            time.sleep(wait_s)


def response_blocks(url, offset):
    """The blocks of one GET of url, from byte offset on."""
    # identity: a compressed transfer would not match Content-Length or byte ranges
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    received = 0
    try:
        with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT_S) as response:
            skip = bytes_to_skip(url, response, offset)
            if skip is None:
                return
            length = response.headers.get("Content-Length", "")
            expected = int(length) - skip if length.isdigit() else None
            for block in response.iter_content(DOWNLOAD_BLOCK):
                dropped = min(skip, len(block))
                skip -= dropped
                if len(block) > dropped:
                    received += len(block) - dropped
                    yield block[dropped:]
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as error:
        raise RetryableError(f"{url}: {error}") from None
    except requests.exceptions.InvalidSchema as error:  # a redirect to file://, ftp://, ...
        raise WebTextError(f"download failed: {url} redirected to a URL that is not http(s): {error}") from None
    if expected is not None and received != expected:
        raise RetryableError(f"{url}: transfer stopped at {offset + received:,} of "
                             f"{offset + expected:,} bytes")


def bytes_to_skip(url, response, offset):
    """How many bytes of the response the caller already has (None: all of them), or the
    error that the status means."""
    status = response.status_code
    if status in RETRY_STATUSES:
        retry_after = response.headers.get("Retry-After", "")
        wait_s = min(int(retry_after), 60) if retry_after.isdigit() else None
        raise RetryableError(f"{url} answered {status} {response.reason}", wait_s)
    if status == 416 and offset:  # nothing past offset: complete, unless the file shrank
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        if total == str(offset):
            return None
        raise WebTextError(f"download failed: {url} now has {total or 'fewer'} bytes, but "
                           f"{offset:,} were fetched before: the file changed on the server")
    if status >= 400:
        raise RemoteError(url, status, response.reason)
    if status == 206:
        if not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            raise RetryableError(f"{url} sent the wrong range {response.headers.get('Content-Range')}")
        return 0
    return offset  # a whole file again: the server ignored Range


def download_name(url):
    """A file name for url that cannot leave the downloads folder: a hash of the URL and
    the last path segment reduced to safe characters."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise WebTextError(f"--url: {url!r} is not an http(s) URL")
    last = re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.basename(parts.path))[-80:]
    return f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{last or 'index'}"


def fetch(url, path, previous_path, progress=None):
    """path, holding the bytes of url: already there, linked from previous_path (a
    download of an earlier run), or downloaded now."""
    if not path.exists() and previous_path.exists():
        link_or_copy(previous_path, path)
    if not path.exists():
        download(url, path, progress)
    return path


def link_or_copy(source, target):
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def download(url, path, progress=None):
    """Fetches url into path through path.part; a .part left by an earlier run is resumed.
    progress: anything with update(megabytes) and finish(megabytes), such as owngpt.workers.Progress."""
    partial = path.with_name(path.name + ".part")
    blocks = remote_blocks(url, offset=partial.stat().st_size if partial.exists() else 0)
    first = next(blocks, b"")  # no file is made before the server answers
    with open(partial, "ab") as out:
        for block in itertools.chain([first], blocks):
            out.write(block)
            if progress:
                progress.update(out.tell() / 1e6)
        size = out.tell()
    if progress:
        progress.finish(size / 1e6)
    os.replace(partial, path)


# ----------------------------------------------------------------------------------------
# Common Crawl: a crawl's WET files (the text of its pages), streamed from its server

def wet_file_urls(crawl, wet_files, base_url, index_url):
    """(crawl id, the crawl's wet.paths.gz URL, its first wet_files WET file paths); crawl
    "latest" means the newest crawl in index_url. A WET file's URL is base_url + its path."""
    if crawl == "latest":
        crawl = crawl_ids(index_url)[0]
    paths_url = f"{base_url}crawl-data/{crawl}/wet.paths.gz"
    try:
        listing = b"".join(remote_blocks(paths_url))
    except RemoteError as error:
        if error.status not in (403, 404):  # S3 answers 403 for a key that is not there
            raise
        raise WebTextError(unknown_crawl_message(crawl, index_url, error.status)) from None
    try:
        paths = gzip.decompress(listing).decode().split()
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise WebTextError(f"{paths_url}: expected a gzipped list of WET file paths ({error})") from None
    if len(paths) < wet_files:
        raise WebTextError(f"--wet_files={wet_files}: crawl {crawl} has only {len(paths)} WET files")
    return crawl, paths_url, paths[:wet_files]


def crawl_ids(index_url):
    """The crawl ids in Common Crawl's collinfo.json, newest first."""
    data = b"".join(remote_blocks(index_url))
    try:
        ids = [crawl["id"] for crawl in json.loads(data)]
    except (ValueError, TypeError, KeyError):
        raise WebTextError(f"{index_url}: expected Common Crawl's collinfo.json, a JSON list of "
                           f"crawls with an 'id' each") from None
    if not ids:
        raise WebTextError(f"{index_url} lists no crawls")
    return ids


def unknown_crawl_message(crawl, index_url, status):
    message = f"--crawl={crawl}: Common Crawl has no crawl with that id (its wet.paths.gz: {status})."
    try:
        ids = crawl_ids(index_url)
        closest = difflib.get_close_matches(crawl, ids, n=1)
        message += f" The newest crawls are {', '.join(ids[:5])}"
        message += f"; the closest to yours is {closest[0]}." if closest else "."
    except WebTextError:
        pass  # the hint below still says where to look
    return (message + f" Every crawl is listed in {index_url} and on "
            f"https://commoncrawl.org/get-started; --crawl=latest takes the newest.")
