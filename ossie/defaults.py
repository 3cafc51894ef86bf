"""Defaults that the command line shows in its help and the engine uses, in a module that imports nothing, so that
`ossie --help` states them without loading torch."""

PREFILL_CHUNK = 512  # tokens computed per step (a prompt chunk; with several sequences, all of theirs together)

# The default KV budget, for the running requests' caches and the cached prefixes together: the 20b's weights take
# about 12.8 GiB resident, so 2 GiB of KV (about 43,000 cached positions at 48 KiB each in bf16, all 24 layers;
# twice as many with kv_cache_dtype="q8") keeps it within 16 GiB.
DEFAULT_BUDGET_GB = 2.0

NUM_SPECULATIVE_TOKENS = 4  # guesses a step checks at most for one request (--speculative ngram)
