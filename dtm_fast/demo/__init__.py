"""`dtm demo`: the whole DTM experiment on embedded assets (SmolLM2, chatterbot-corpus, MMLU)."""
