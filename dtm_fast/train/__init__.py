"""The sub-model trainer (`dtm train`): SFT of one causal LM on one data portion, full or LoRA,
one process or FSDP2 over many. Entry points: cli.py (`dtm train`), __main__.py (torchrun)."""
