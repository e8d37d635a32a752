"""Sharing an exported model: push a folder to the Hugging Face Hub, and write a Gradio Space for it.

:func:`push_folder` uploads a folder (``lmforge export --to DIR``) to a model, dataset or Space
repository: it creates the repository if needed (``private`` applies only then), the branch named
by ``revision``, and commits every file in one upload. The token is the one given, else
huggingface_hub's usual ones (``HF_TOKEN``, then the token ``hf auth login`` stored); it is never
printed, and every failure (no token, a refused token, no network) ends in one line, a
:class:`HubError`, with no token in it.

:func:`write_space` writes a folder that is a complete Gradio Space for a transformers model
folder: ``app.py`` (a text-generation demo with streaming, or a classifier showing the label
probabilities for ``*ForSequenceClassification`` models), ``requirements.txt`` and a ``README.md``
with the Spaces header (the model card's licence, or none when the card names none). Push it with ``push_folder(space_dir, "owner/name", repo_type="space")``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmforge.atomic import staged_folder
from lmforge.errors import ExistingPathError, MissingFileError, UserError

REPO_TYPES = ("model", "dataset", "space")
GRADIO_SDK_VERSION = "6.31.0"
"""The Gradio version a Space runs (``sdk_version`` in its README); app.py runs on Gradio 5 too."""
SPACE_REQUIREMENTS = ["transformers>=4.46", "torch>=2.1", "safetensors>=0.4", "gradio>=5.0"]
SPACE_COLORS = ("red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,94}[A-Za-z0-9]|[A-Za-z0-9]")
_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{8,}\b")
_IGNORED_PARTS = (".git", ".cache")  # what huggingface_hub's upload_folder leaves out as well
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_LOGIN_HINT = (
    "run `hf auth login` or set HF_TOKEN to a token with write access (https://huggingface.co/settings/tokens)"
)


class HubError(UserError):
    """A push to the Hub failed; the message is one line and never contains the token."""


def validate_repo_id(repo_id: str) -> str:
    """``repo_id`` when it is ``owner/name`` as the Hub accepts it, else a :class:`HubError`."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    ok = len(parts) == 2 and all(_NAME.fullmatch(part) and ".." not in part and "--" not in part for part in parts)
    if not ok or repo_id.endswith(".git"):
        raise HubError(
            f"repo id {repo_id!r} is not owner/name (letters, digits, '-', '_' and '.', at most 96 characters each, "
            "for example alice/gpt-small)"
        )
    return repo_id


def _files(folder: Path) -> list[Path]:
    """The files of ``folder`` that an upload sends, in a stable order."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and not any(part in _IGNORED_PARTS for part in path.relative_to(folder).parts)
    )


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _one_line(text: str, token: str | None) -> str:
    """``text`` on one line, without the token (or anything shaped like one)."""
    if token:
        text = text.replace(token, "***")
    text = _TOKEN_LIKE.sub("hf_***", text)
    return " ".join(text.split())


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of the HTTP clients huggingface_hub uses (httpx2, httpx, requests) for a failed connection."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    for name, attr in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException")):
        module = sys.modules.get(name)
        error = getattr(module, attr, None) if module is not None else None
        if isinstance(error, type) and issubclass(error, BaseException):
            errors.append(error)
    return tuple(errors)


def _http_message(status: int | None, err: Exception, repo_id: str, repo_type: str, action: str) -> str:
    what = f"{repo_type} repo {repo_id}" if repo_type != "model" else repo_id
    if status == 401:
        return f"the Hugging Face Hub refused the token (401 Unauthorized) while {action}: {_LOGIN_HINT}"
    if status == 403:
        return (
            f"the token may not write to {what} (403 Forbidden) while {action}: use a token with write access "
            f"to that namespace; {_LOGIN_HINT}"
        )
    if status == 402:
        return (
            f"the Hub asks for a paid plan (402 Payment Required) while {action}: a Gradio Space on free hardware "
            "needs a PRO, Team or Enterprise plan"
        )
    if status == 404:
        return f"{what} was not found (404) while {action}: check the repo id, the repo type and the token's access"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"the Hugging Face Hub answered {status or 'an error'} while {action}: {first}"


@contextmanager
def _hub_errors(action: str, repo_id: str, repo_type: str, endpoint: str, token: str | None) -> Iterator[None]:
    """Turns what huggingface_hub raises into a one-line :class:`HubError`."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except HubError as err:
        raise HubError(_one_line(str(err), token)) from None
    except OfflineModeIsEnabled:
        raise HubError(f"cannot push while HF_HUB_OFFLINE is set ({action}): unset it and retry") from None
    except HfHubHTTPError as err:
        response = getattr(err, "response", None)
        status = getattr(response, "status_code", None)
        raise HubError(_one_line(_http_message(status, err, repo_id, repo_type, action), token)) from None
    except _network_errors() as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        message = f"cannot reach the Hugging Face Hub at {endpoint} while {action} ({type(err).__name__}"
        message += f": {detail})" if detail else ")"
        raise HubError(_one_line(message + "; check the network connection or HF_ENDPOINT", token)) from None
    except ValueError as err:  # e.g. the README.md metadata the Hub rejects
        raise HubError(_one_line(f"{action} failed: {err}", token)) from None


def _resolve_token(token: str | None) -> str:
    if token:
        return token
    from huggingface_hub import get_token

    try:
        found = get_token()
    except Exception as err:  # an OIDC exchange (HF_OIDC_RESOURCE) that failed
        raise HubError(_one_line(f"no Hugging Face token ({type(err).__name__}: {err}): {_LOGIN_HINT}", None)) from None
    if not found:
        raise HubError(f"no Hugging Face token found: {_LOGIN_HINT}")
    return found


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    repo_type: str = "model",
    endpoint: str | None = None,
) -> str:
    """Upload every file of ``folder`` to the Hub repository ``repo_id``; returns the commit's URL.

    The repository is created when it does not exist (``private`` is used only then), and the branch
    ``revision`` too when it is not ``main``. ``endpoint`` is the Hub's address (default: ``HF_ENDPOINT``,
    else huggingface.co). Failures end in one line, a :class:`HubError`.
    """
    import lmforge

    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"folder {folder} not found (nothing to push)")
    if repo_type not in REPO_TYPES:
        raise HubError(f"repo type {repo_type!r} is not one of {', '.join(REPO_TYPES)}")
    validate_repo_id(repo_id)
    if revision is not None and not revision.strip():
        raise HubError("revision is empty; give a branch name or leave it out for main")
    files = _files(folder)
    if not files:
        raise HubError(f"folder {folder} has no files to push")
    size = sum(path.stat().st_size for path in files)
    token = _resolve_token(token)

    from huggingface_hub import HfApi, constants

    # HF_ENDPOINT is read when called, not only when huggingface_hub was imported (mirrors, tests).
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    endpoint = api.endpoint or constants.ENDPOINT
    branch = revision if revision and revision != "main" else None
    where = f"{repo_id}" + (f" (branch {branch})" if branch else "")
    message = commit_message or f"Upload {folder.name} with lmforge {lmforge.__version__}"
    kind = "" if repo_type == "model" else f"{repo_type} "

    with _hub_errors(f"creating {kind}repo {repo_id}", repo_id, repo_type, endpoint, token):
        url = api.create_repo(
            repo_id,
            private=private,
            exist_ok=True,
            repo_type=repo_type,
            **({"space_sdk": "gradio"} if repo_type == "space" else {}),
        )
    print(f"lmforge: {kind}repo {url} ready" + (" (private if created now)" if private else ""), flush=True)
    if branch:
        with _hub_errors(f"creating branch {branch} in {repo_id}", repo_id, repo_type, endpoint, token):
            api.create_branch(repo_id, branch=branch, repo_type=repo_type, exist_ok=True)
        print(f"lmforge: branch {branch} ready", flush=True)
    print(f"lmforge: uploading {len(files)} files ({format_bytes(size)}) from {folder} to {where}", flush=True)
    with _hub_errors(f"uploading {folder} to {where}", repo_id, repo_type, endpoint, token):
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type=repo_type,
            revision=revision,
            commit_message=message,
        )
    commit_url = str(getattr(info, "commit_url", None) or info)
    print(f"lmforge: pushed {len(files)} files ({format_bytes(size)}) to {commit_url}", flush=True)
    return commit_url


# -- Gradio Space --------------------------------------------------------------------------------

_APP_HEADER = '''\
"""A Gradio demo of @TITLE@, written by lmforge (lmforge.hub.write_space)."""

from pathlib import Path
from threading import Thread

import gradio as gr
import torch
from transformers import @AUTO_MODEL@, AutoTokenizer@EXTRA_IMPORT@

TITLE = @TITLE@
MODEL = @MODEL@
"""A Hugging Face Hub repo id, or a folder next to this file."""
LOCAL = @LOCAL@
SOURCE = str(Path(__file__).resolve().parent / MODEL) if LOCAL else MODEL

tokenizer = AutoTokenizer.from_pretrained(SOURCE)
model = @AUTO_MODEL@.from_pretrained(SOURCE)
model.eval()
CONTEXT = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None) or 2048
'''

_APP_GENERATE = '''
MAX_NEW_TOKENS = max(1, min(512, CONTEXT - 1))


def generate(prompt: str, max_new_tokens: float = 64, temperature: float = 0.8, top_k: float = 50):
    """Stream the prompt followed by the model's continuation."""
    prompt = prompt or ""
    start = prompt or tokenizer.bos_token or tokenizer.eos_token
    if not start:
        raise gr.Error("Type a prompt first.")
    max_new_tokens = max(1, min(int(max_new_tokens), MAX_NEW_TOKENS))
    ids = tokenizer(start, return_tensors="pt")["input_ids"][:, -(CONTEXT - max_new_tokens) :]
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_k=int(top_k))
    else:
        kwargs.update(do_sample=False)
    errors = []

    def run():
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except Exception as err:  # shown in the demo instead of a stream that never ends
            errors.append(err)
            streamer.end()

    thread = Thread(target=run, daemon=True)
    thread.start()
    text = prompt
    for piece in streamer:
        text += piece
        yield text
    thread.join()
    if errors:
        raise gr.Error(f"Generation failed: {errors[0]}")


with gr.Blocks(title=TITLE) as demo:
    gr.Markdown(f"# {TITLE}\\n\\nType the start of a text; the model continues it. Temperature 0 is greedy decoding.")
    prompt = gr.Textbox(label="Prompt", lines=4, placeholder="Once upon a time")
    with gr.Row():
        max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=min(64, MAX_NEW_TOKENS), step=1, label="Max new tokens")
        temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="Temperature")
        top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k (0: all tokens)")
    button = gr.Button("Generate", variant="primary")
    output = gr.Textbox(label="Text", lines=10)
    inputs = [prompt, max_new_tokens, temperature, top_k]
    button.click(generate, inputs, output)
    prompt.submit(generate, inputs, output)

if __name__ == "__main__":
    demo.queue().launch()
'''

_APP_CLASSIFY = '''
LABELS = {int(i): label for i, label in model.config.id2label.items()}


def classify(text: str) -> dict:
    """The probability of every label for ``text``."""
    if not text or not text.strip():
        return {}
    inputs = tokenizer(text, return_tensors="pt", truncation=True, max_length=CONTEXT)
    with torch.inference_mode():
        probs = model(**inputs).logits.float().softmax(-1)[0]
    return {LABELS.get(i, str(i)): float(p) for i, p in enumerate(probs.tolist())}


with gr.Blocks(title=TITLE) as demo:
    gr.Markdown(f"# {TITLE}\\n\\nType a text; the model gives the probability of each label.")
    text = gr.Textbox(label="Text", lines=4)
    button = gr.Button("Classify", variant="primary")
    output = gr.Label(label="Labels", num_top_classes=min(10, len(LABELS)))
    button.click(classify, text, output)
    text.submit(classify, text, output)

if __name__ == "__main__":
    demo.queue().launch()
'''


def card_metadata(card: str | Path) -> dict:
    """The YAML front matter of a model card (a README.md), or {} when it has none or cannot be read."""
    card = Path(card)
    try:
        text = card.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return {}
    import yaml

    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def card_license(card: str | Path | dict) -> str | None:
    """The ``license`` a model card (README.md, or its front matter as read by :func:`card_metadata`) names."""
    value = (card if isinstance(card, dict) else card_metadata(card)).get("license")
    return value.strip() if isinstance(value, str) and value.strip() else None


def _yaml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def write_space(
    model_dir: str | Path,
    space_dir: str | Path,
    *,
    model_repo_id: str | None = None,
    title: str | None = None,
) -> Path:
    """Write a Gradio Space for the transformers model folder ``model_dir`` to ``space_dir`` (must not exist).

    With ``model_repo_id`` the demo loads the model from that Hub repository; without, the model
    folder is copied to ``space_dir/model`` and loaded from there. A ``*ForSequenceClassification``
    model gets a classifier demo, any other a text-generation demo. The Space's ``license`` is the one
    the model card (``model_dir/README.md``) names; without one the Space names none.
    """
    model_dir, space_dir = Path(model_dir), Path(space_dir)
    if space_dir.exists():
        raise ExistingPathError(f"space folder {space_dir} already exists; remove it or choose another")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise MissingFileError(f"{config_path} not found: give a model folder exported for transformers")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{config_path} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(
            f"{model_dir} is not a transformers model folder (config.json has no model_type): "
            "export the checkpoint in the Hugging Face format first"
        )
    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise UserError(f"{model_dir} has no tokenizer ({' or '.join(_TOKENIZER_FILES)}); the demo needs one")
    if model_repo_id is not None:
        validate_repo_id(model_repo_id)
    architectures = [str(a) for a in config.get("architectures") or []]
    classify = any(a.endswith("ForSequenceClassification") for a in architectures)
    name = model_repo_id.split("/")[1] if model_repo_id else model_dir.resolve().name
    title = " ".join((title or name).split()) or "lmforge model"
    card = card_metadata(model_dir / "README.md")
    license_id = card_license(card)  # the model's, or none: never one nobody chose
    license_lines = [f"license: {_yaml_str(license_id)}"] if license_id else []
    if license_id == "other":  # a custom licence: its name and link travel with it
        license_lines += [f"{k}: {_yaml_str(str(card[k]))}" for k in ("license_name", "license_link") if card.get(k)]

    app = (_APP_HEADER + (_APP_CLASSIFY if classify else _APP_GENERATE)).replace("@TITLE@", repr(title))
    app = app.replace("@MODEL@", repr(model_repo_id or "model")).replace("@LOCAL@", repr(model_repo_id is None))
    auto = "AutoModelForSequenceClassification" if classify else "AutoModelForCausalLM"
    app = app.replace("@AUTO_MODEL@", auto).replace("@EXTRA_IMPORT@", "" if classify else ", TextIteratorStreamer")
    compile(app, "app.py", "exec")  # a template error must never reach a Space

    description = f"{'Classify' if classify else 'Generate'} text with {name}"
    description = description if len(description) <= 60 else description[:59] + "…"  # the Hub's limit: 60
    header = [
        "---",
        f"title: {_yaml_str(title)}",
        "emoji: 🔨",
        "colorFrom: indigo",
        "colorTo: purple",
        "sdk: gradio",
        f'sdk_version: "{GRADIO_SDK_VERSION}"',
        "app_file: app.py",
        "pinned: false",
        *license_lines,
        f"short_description: {_yaml_str(description)}",
        *(["models:", f"  - {model_repo_id}"] if model_repo_id else []),
        "---",
    ]
    source = (
        f"the model [{model_repo_id}](https://huggingface.co/{model_repo_id}) (a private model needs an `HF_TOKEN` "
        "secret in the Space's settings)"
        if model_repo_id
        else "the model in `model/`, a copy of the exported folder"
    )
    readme = "\n".join(header) + (
        f"\n\n# {title}\n\n"
        f"A {'text-classification' if classify else 'text-generation'} demo of {source}, "
        f"written by lmforge ({', '.join(architectures) or config['model_type']}).\n\n"
        "Run it locally with `pip install -r requirements.txt && python app.py`.\n"
    )

    with staged_folder(space_dir) as tmp:
        if model_repo_id is None:
            shutil.copytree(model_dir, tmp / "model", ignore=shutil.ignore_patterns(*_IGNORED_PARTS))
        (tmp / "app.py").write_text(app, encoding="utf-8")
        (tmp / "requirements.txt").write_text("\n".join(SPACE_REQUIREMENTS) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(readme, encoding="utf-8")
    return space_dir
