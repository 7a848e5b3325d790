"""Web text for prepare.py: crawl (HTTP downloads that resume, Common Crawl's listings, WARC/WET
records read as the bytes arrive) and filters (language, quality, repetition, line cleanup,
deduplication, PII masking)."""
