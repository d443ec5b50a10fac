"""Benchmarks behind `dtm bench merge|train`: each one measures dtm_fast side by side with its peer
tool in one run and writes a table, JSON and a PNG chart."""
