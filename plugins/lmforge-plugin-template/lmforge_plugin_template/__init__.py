"""lmforge-plugin-template: one small, real lmforge plugin of each kind, to copy.

- ``csv`` (``lmforge.datasets``): one document per row of a CSV file's text column (:mod:`.dataset`);
- ``wordlevel`` (``lmforge.tokenizers``): a word-level tokenizer in plain Python, trained on the corpus
  and restored from checkpoints through ``from_dict`` (:mod:`.tokenizer`);
- ``adafactor`` (``lmforge.optimizers``): ``torch.optim.Adafactor`` with lmforge's weight-decay groups
  (:mod:`.optimizer`);
- ``linear`` (``lmforge.schedulers``): linear warmup, then linear decay (:mod:`.scheduler`);
- ``npz`` (``lmforge.exporters``): the GPT's weights as one NumPy ``.npz`` plus its config as JSON
  (:mod:`.exporter`).

Importing this package imports none of its modules: lmforge imports a plugin's module only when a
config uses it, so each module imports only what it needs.
"""

__version__ = "0.1.0"
