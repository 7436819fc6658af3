"""New words into a tokenizer: the lexicon, whole-word and segmented injection, vocabulary padding."""
