"""Data: corpus sources, the embedded synthetic corpus, the token cache and the data modules."""
