"""What a stage reads from outside the store: corpora, tokenizers, SAEs."""
