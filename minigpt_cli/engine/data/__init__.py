"""Layer 4: text in, token ids out: records, built-in data, tokenizer, shards, chat template,
SFT examples and preference pairs."""
