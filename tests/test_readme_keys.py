"""The README's command lines use keys that exist: a flag it shows must not be an error when typed."""

import inspect
import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _params(*classes) -> set[str]:
    return {name for cls in classes for name in inspect.signature(cls.__init__).parameters if name != "self"}


def test_data_and_model_flags_in_the_readme_exist():
    from lmforge import (
        ClassificationDataModule,
        ClassifierModule,
        PreferenceDataModule,
        PreferenceModule,
        PretrainDataModule,
        PretrainModule,
        SFTDataModule,
        SFTModule,
    )

    data = _params(PretrainDataModule, SFTDataModule, ClassificationDataModule, PreferenceDataModule)
    model = _params(PretrainModule, SFTModule, ClassifierModule, PreferenceModule)
    used_data = set(re.findall(r"--data\.(\w+)", README))
    used_model = set(re.findall(r"--model\.(\w+)", README))
    assert used_data and used_model
    assert used_data <= data, f"README shows --data keys that do not exist: {sorted(used_data - data)}"
    assert used_model <= model, f"README shows --model keys that do not exist: {sorted(used_model - model)}"
    assert "data.corpus" not in README  # the old name of data.dataset


def test_error_messages_name_keys_that_exist():
    """Messages telling the user to set data.<key> name a key of some data module."""
    from lmforge import ClassificationDataModule, PretrainDataModule, SFTDataModule

    data = _params(PretrainDataModule, SFTDataModule, ClassificationDataModule)
    sources = Path(__file__).resolve().parents[1] / "lmforge"
    named = set()
    for path in sources.rglob("*.py"):
        named |= set(re.findall(r"set data\.(\w+)", path.read_text(encoding="utf-8")))
    assert named and named <= data, f"messages name data keys that do not exist: {sorted(named - data)}"
