"""lmforge: pretrain and fine-tune Transformer language models with PyTorch Lightning and Triton.

Importing lmforge is cheap: submodules (model, data, CLI) load when used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "GPT": "lmforge.model",
    "GPTConfig": "lmforge.model",
    "Encoder": "lmforge.encoder",
    "EncoderConfig": "lmforge.encoder",
    "MaskedLMModule": "lmforge.masked_lm",
    "MLMDataModule": "lmforge.data.mlm",
    "PretrainModule": "lmforge.pretrain",
    "PretrainDataModule": "lmforge.data.pretrain",
    "SFTModule": "lmforge.finetune",
    "PreferenceModule": "lmforge.preference",
    "PreferenceDataModule": "lmforge.data.preference",
    "ClassifierModule": "lmforge.finetune",
    "SFTDataModule": "lmforge.data.sft",
    "ClassificationDataModule": "lmforge.data.classify",
}

if TYPE_CHECKING:
    from lmforge.data.classify import ClassificationDataModule
    from lmforge.data.mlm import MLMDataModule
    from lmforge.data.preference import PreferenceDataModule
    from lmforge.data.pretrain import PretrainDataModule
    from lmforge.data.sft import SFTDataModule
    from lmforge.encoder import Encoder, EncoderConfig
    from lmforge.finetune import ClassifierModule, SFTModule
    from lmforge.masked_lm import MaskedLMModule
    from lmforge.model import GPT, GPTConfig
    from lmforge.preference import PreferenceModule
    from lmforge.pretrain import PretrainModule

__all__ = [
    "GPT",
    "ClassificationDataModule",
    "ClassifierModule",
    "Encoder",
    "EncoderConfig",
    "GPTConfig",
    "MLMDataModule",
    "MaskedLMModule",
    "PreferenceDataModule",
    "PreferenceModule",
    "PretrainDataModule",
    "PretrainModule",
    "SFTDataModule",
    "SFTModule",
    "__version__",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
