"""Benchmarks: tokens/s here (run), device kits (plan), phone results (ingest), the SQLite store and the report."""
