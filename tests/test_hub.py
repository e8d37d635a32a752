"""lmforge.hub: pushing a folder to a local fake Hub (never the real one) and writing a Gradio Space."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import shutil
import socket
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
import yaml

from lmforge import hub
from lmforge.hub import HubError, push_folder, write_space

TOKEN = "hf_lmforgeFakeToken0123456789abcdefXYZ"
_REPO = r"/api/(models|datasets|spaces)/([^/]+/[^/]+)"


class FakeHub:
    """The few Hub endpoints huggingface_hub calls to create a repo and a branch and commit small files."""

    def __init__(self, fail_status: int | None = None, fail_path: str = ".*"):
        self.fail_status, self.fail_path = fail_status, fail_path
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.branches: set[tuple[str, str]] = set()
        self.commits: list[dict] = []
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = urlsplit(self.path).path
                with fake.lock:
                    fake.requests.append(
                        {
                            "method": self.command,
                            "path": path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                        }
                    )
                if fake.fail_status and re.fullmatch(fake.fail_path, path):
                    return self._answer(fake.fail_status, {"error": "Invalid credentials in Authorization header"})
                if self.command == "POST" and path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload['organization']}/{payload['name']}"
                    prefix = "" if payload.get("type", "model") == "model" else f"{payload['type']}s/"
                    with fake.lock:
                        exists = repo_id in fake.repos
                        fake.repos.setdefault(repo_id, payload)
                    url = f"{fake.endpoint}/{prefix}{repo_id}"
                    if exists:  # as the Hub answers: 409, with the repo's url
                        return self._answer(409, {"error": "You already created this model repo", "url": url})
                    return self._answer(200, {"url": url})
                if self.command == "POST" and path == "/api/validate-yaml":
                    return self._answer(200, {"errors": [], "warnings": []})
                if self.command == "POST" and (match := re.fullmatch(_REPO + r"/branch/(.+)", path)):
                    with fake.lock:
                        fake.branches.add((match[2], unquote(match[3])))
                    return self._answer(200, {})
                if self.command == "POST" and (match := re.fullmatch(_REPO + r"/preupload/(.+)", path)):
                    files = json.loads(body)["files"]
                    return self._answer(
                        200,
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                    )
                if self.command == "POST" and (match := re.fullmatch(_REPO + r"/commit/(.+)", path)):
                    repo_id, revision = match[2], unquote(match[3])
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    assert lines[0]["key"] == "header"
                    with fake.lock:
                        fake.commits.append(
                            {"repo_type": match[1], "repo_id": repo_id, "revision": revision, "lines": lines}
                        )
                        for line in lines[1:]:
                            assert line["key"] == "file" and line["value"]["encoding"] == "base64", line
                            content = base64.b64decode(line["value"]["content"])
                            fake.files[(repo_id, revision, line["value"]["path"])] = content
                    oid = "0123456789abcdef0123456789abcdef01234567"
                    prefix = "" if match[1] == "models" else f"{match[1]}/"
                    url = f"{fake.endpoint}/{prefix}{repo_id}/commit/{oid}"
                    return self._answer(200, {"success": True, "commitOid": oid, "commitUrl": url})
                return self._answer(404, {"error": f"fake hub: no route for {self.command} {path}"})

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        return Handler

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def unexpected(self) -> list[str]:
        known = ("/api/repos/create", "/api/validate-yaml")
        return [
            f"{r['method']} {r['path']}"
            for r in self.requests
            if r["path"] not in known and not re.fullmatch(_REPO + r"/(branch|preupload|commit)/.+", r["path"])
        ]


@pytest.fixture(autouse=True)
def hub_env(monkeypatch, tmp_path):
    """No real network, no token from the machine, no proxy in the way of 127.0.0.1."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)


@pytest.fixture
def fake_hub(monkeypatch):
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


@pytest.fixture
def export_dir(tmp_path) -> Path:
    """A folder shaped like an export: weights (binary), config, tokenizer, a model card, a nested file."""
    folder = tmp_path / "export"
    (folder / "extra" / "nested").mkdir(parents=True)
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    (folder / "config.json").write_text(json.dumps({"n_layer": 2, "vocab_size": 256}) + "\n")
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE"}}\n')
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: lmforge\n---\n\n# tiny\n")
    (folder / "extra" / "nested" / "notes.txt").write_text("héllo wörld\n", encoding="utf-8")
    (folder / "empty.txt").write_bytes(b"")
    return folder


def _expected_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and ".git" not in p.relative_to(folder).parts
    }


def _assert_one_line_without_token(text: str) -> None:
    assert "\n" not in text
    assert TOKEN not in text


def test_push_private_to_a_branch(fake_hub, export_dir, capsys):
    url = push_folder(
        export_dir,
        "alice/tiny-gpt",
        private=True,
        revision="v1",
        token=TOKEN,
        commit_message="first upload",
        endpoint=fake_hub.endpoint,
    )
    assert url.startswith(f"{fake_hub.endpoint}/alice/tiny-gpt/commit/")
    assert fake_hub.unexpected() == []
    created = fake_hub.repos["alice/tiny-gpt"]
    assert created.get("private") is True or created.get("visibility") == "private"
    assert created.get("type", "model") == "model"
    assert fake_hub.branches == {("alice/tiny-gpt", "v1")}
    assert len(fake_hub.commits) == 1
    assert fake_hub.commits[0]["revision"] == "v1"
    assert fake_hub.commits[0]["lines"][0]["value"]["summary"] == "first upload"
    expected = _expected_files(export_dir)
    assert len(expected) == 6 and ".git/HEAD" not in expected
    assert {path: data for (_, rev, path), data in fake_hub.files.items() if rev == "v1"} == expected
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in fake_hub.requests)
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    assert "6 files" in out and "alice/tiny-gpt" in out and "branch v1" in out and url in out


def test_push_uses_hf_token_from_the_environment(fake_hub, export_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    url = push_folder(export_dir, "alice/public-gpt", endpoint=fake_hub.endpoint)
    assert "/alice/public-gpt/commit/" in url
    created = fake_hub.repos["alice/public-gpt"]
    assert created.get("private") in (False, None) and created.get("visibility") in ("public", None)
    assert fake_hub.branches == set()  # no revision: main, which exists
    assert {c["revision"] for c in fake_hub.commits} == {"main"}
    assert {path for (_, rev, path) in fake_hub.files if rev == "main"} == set(_expected_files(export_dir))
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in fake_hub.requests)
    out, err = capsys.readouterr()
    assert TOKEN not in out + err


def test_push_again_to_an_existing_repo(fake_hub, export_dir, capsys):
    push_folder(export_dir, "alice/tiny-gpt", token=TOKEN, endpoint=fake_hub.endpoint)
    (export_dir / "config.json").write_text('{"n_layer": 3}')
    push_folder(export_dir, "alice/tiny-gpt", token=TOKEN, endpoint=fake_hub.endpoint, private=True)
    assert [r["path"] for r in fake_hub.requests].count("/api/repos/create") == 2  # the second answered 409
    assert len(fake_hub.commits) == 2
    assert fake_hub.files[("alice/tiny-gpt", "main", "config.json")] == b'{"n_layer": 3}'


def test_push_a_space(fake_hub, export_dir, capsys):
    push_folder(export_dir, "alice/demo", repo_type="space", token=TOKEN, endpoint=fake_hub.endpoint)
    created = fake_hub.repos["alice/demo"]
    assert created["type"] == "space" and created["sdk"] == "gradio"
    assert fake_hub.commits[0]["repo_type"] == "spaces"
    assert TOKEN not in "".join(capsys.readouterr())


@pytest.mark.parametrize(("status", "words"), [(401, "hf auth login"), (403, "write access"), (500, "answered 500")])
def test_refused_push_is_one_line(status, words, export_dir, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda s: None, raising=False)
    with FakeHub(fail_status=status) as server:
        with pytest.raises(HubError) as info:
            push_folder(export_dir, "alice/tiny-gpt", token=TOKEN, endpoint=server.endpoint)
    message = str(info.value)
    _assert_one_line_without_token(message)
    assert words in message
    out, err = capsys.readouterr()
    assert TOKEN not in out + err


def test_refused_commit_is_one_line(export_dir, capsys):
    with FakeHub(fail_status=403, fail_path=_REPO + "/commit/.+") as server:
        with pytest.raises(HubError, match="403.*while uploading") as info:
            push_folder(export_dir, "alice/tiny-gpt", token=TOKEN, endpoint=server.endpoint)
        assert "alice/tiny-gpt" in server.repos  # created, then the commit was refused
    _assert_one_line_without_token(str(info.value))
    assert TOKEN not in "".join(capsys.readouterr())


@pytest.mark.parametrize(
    "repo_id", ["tiny-gpt", "a/b/c", "-alice/x", "alice/tiny--gpt", "alice/", "/x", "al ice/x", ""]
)
def test_bad_repo_id_is_rejected_before_any_request(repo_id, fake_hub, export_dir):
    with pytest.raises(HubError, match="owner/name") as info:
        push_folder(export_dir, repo_id, token=TOKEN, endpoint=fake_hub.endpoint)
    _assert_one_line_without_token(str(info.value))
    assert fake_hub.requests == []


def test_no_token_tells_how_to_log_in(fake_hub, export_dir):
    with pytest.raises(HubError) as info:
        push_folder(export_dir, "alice/tiny-gpt", endpoint=fake_hub.endpoint)
    assert "hf auth login" in str(info.value) and "HF_TOKEN" in str(info.value)
    _assert_one_line_without_token(str(info.value))
    assert fake_hub.requests == []


def test_unreachable_endpoint_is_one_line(export_dir, capsys):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(HubError, match="cannot reach") as info:
        push_folder(export_dir, "alice/tiny-gpt", token=TOKEN, endpoint=f"http://127.0.0.1:{port}")
    _assert_one_line_without_token(str(info.value))
    assert f"127.0.0.1:{port}" in str(info.value)
    assert TOKEN not in "".join(capsys.readouterr())


def test_offline_mode_is_one_line(export_dir, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE") as info:
        push_folder(export_dir, "alice/tiny-gpt", token=TOKEN, endpoint="http://127.0.0.1:9")
    _assert_one_line_without_token(str(info.value))


def test_nothing_to_push(tmp_path, fake_hub):
    with pytest.raises(FileNotFoundError):
        push_folder(tmp_path / "missing", "alice/x", token=TOKEN, endpoint=fake_hub.endpoint)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HubError, match="no files"):
        push_folder(tmp_path / "empty", "alice/x", token=TOKEN, endpoint=fake_hub.endpoint)
    with pytest.raises(HubError, match="repo type"):
        push_folder(tmp_path / "empty", "alice/x", repo_type="bucket", token=TOKEN, endpoint=fake_hub.endpoint)
    assert fake_hub.requests == []


# -- write_space -------------------------------------------------------------------------------------------------


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("models") / "tiny-lm"
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=eos, eos_token_id=eos
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n\n# tiny-lm\n")
    return folder


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    folder = tmp_path_factory.mktemp("models") / "tiny-classifier"
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    labels = {0: "negative", 1: "positive", 2: "neutral"}
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=32,
        n_embd=16,
        n_layer=1,
        n_head=2,
        num_labels=3,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        pad_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class _Component:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.events = args, kwargs, []
        _Component.created.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def click(self, fn, inputs=None, outputs=None, **kwargs):
        self.events.append(("click", fn))
        return self

    def submit(self, fn, inputs=None, outputs=None, **kwargs):
        self.events.append(("submit", fn))
        return self

    def queue(self, *args, **kwargs):
        return self

    def launch(self, *args, **kwargs):
        raise AssertionError("app.py must not launch on import")


def _gradio_stub() -> types.ModuleType:
    """Just the Gradio names a generated app.py may use: an unknown one fails the import."""
    module = types.ModuleType("gradio")
    _Component.created = []
    for name in ("Blocks", "Markdown", "Textbox", "Row", "Column", "Slider", "Button", "Label"):
        setattr(module, name, type(name, (_Component,), {}))
    module.Error = type("Error", (Exception,), {})
    module.__version__ = hub.GRADIO_SDK_VERSION
    return module


def _import_app(space: Path, monkeypatch) -> types.ModuleType:
    """Import the Space's app.py as Spaces would run it, offline: any request to a Hub fails."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "gradio", _gradio_stub())
    name = f"lmforge_test_space_app_{abs(hash(space))}"
    spec = importlib.util.spec_from_file_location(name, space / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, text
    return yaml.safe_load(match.group(1))


def test_write_space_text_generation(lm_dir, tmp_path, monkeypatch):
    space = write_space(lm_dir, tmp_path / "space", title="Tiny: a GPT")
    assert space == tmp_path / "space"
    assert sorted(p.name for p in space.iterdir()) == ["README.md", "app.py", "model", "requirements.txt"]
    assert (space / "model" / "config.json").read_bytes() == (lm_dir / "config.json").read_bytes()
    meta = _front_matter(space / "README.md")
    assert meta["title"] == "Tiny: a GPT" and meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert meta["sdk_version"] == hub.GRADIO_SDK_VERSION and meta["pinned"] is False
    assert meta["license"] == "mit"  # from the model card
    assert meta["colorFrom"] in hub.SPACE_COLORS and meta["colorTo"] in hub.SPACE_COLORS
    assert meta["emoji"] and len(meta["short_description"]) <= 60 and "models" not in meta
    requirements = (space / "requirements.txt").read_text().split()
    assert {re.split("[<>=]", r)[0] for r in requirements} >= {"transformers", "torch", "gradio"}
    assert all(">=" in r for r in requirements)
    source = (space / "app.py").read_text()
    compile(source, "app.py", "exec")
    assert "AutoModelForCausalLM" in source and "TextIteratorStreamer" in source

    app = _import_app(space, monkeypatch)
    assert any(fn is app.generate for c in _Component.created for _, fn in c.events)
    sliders = [c for c in _Component.created if type(c).__name__ == "Slider"]
    assert [s.kwargs["label"].split(" (")[0] for s in sliders] == ["Max new tokens", "Temperature", "Top-k"]
    greedy = list(app.generate("the quick brown", 6, 0.0, 0))
    assert greedy and all(text.startswith("the quick brown") for text in greedy)
    assert greedy == list(app.generate("the quick brown", 6, 0.0, 0))  # greedy decoding is deterministic
    assert len(app.tokenizer(greedy[-1])["input_ids"]) <= len(app.tokenizer("the quick brown")["input_ids"]) + 6
    sampled = list(app.generate("the lazy dog", 5, 0.9, 10))
    assert sampled[-1].startswith("the lazy dog")
    # a prompt longer than the context (32 positions) and too many new tokens: cut to fit, no error
    long = list(app.generate("the quick brown fox jumps over the lazy dog " * 6, 500, 1.0, 0))
    assert long and long[-1].startswith("the quick brown fox")
    assert list(app.generate("", 3, 0.0, 0))  # an empty prompt starts from the end-of-text token


def test_write_space_classifier(classifier_dir, tmp_path, monkeypatch):
    space = write_space(classifier_dir, tmp_path / "space")
    source = (space / "app.py").read_text()
    assert "AutoModelForSequenceClassification" in source
    meta = _front_matter(space / "README.md")
    assert meta["title"] == "tiny-classifier"
    assert "license" not in meta  # the model names no licence (no model card): the Space claims none either
    app = _import_app(space, monkeypatch)
    assert any(fn is app.classify for c in _Component.created for _, fn in c.events)
    assert any(type(c).__name__ == "Label" for c in _Component.created)
    probs = app.classify("the quick brown fox")
    assert set(probs) == {"negative", "positive", "neutral"}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert app.classify("   ") == {}


def test_write_space_carries_a_custom_licence(lm_dir, tmp_path):
    model = tmp_path / "custom"
    shutil.copytree(lm_dir, model)
    (model / "README.md").write_text(
        "---\nlicense: other\nlicense_name: tiny-licence\nlicense_link: https://example.com/licence\n---\n# m\n"
    )
    meta = _front_matter(write_space(model, tmp_path / "space") / "README.md")
    assert (meta["license"], meta["license_name"], meta["license_link"]) == (
        "other",
        "tiny-licence",
        "https://example.com/licence",
    )
    assert hub.card_license(model / "README.md") == "other" and hub.card_license(tmp_path / "nowhere.md") is None


def test_write_space_from_a_hub_repo(lm_dir, tmp_path):
    space = write_space(lm_dir, tmp_path / "space", model_repo_id="alice/tiny-lm")
    assert not (space / "model").exists()
    source = (space / "app.py").read_text()
    compile(source, "app.py", "exec")
    assert "MODEL = 'alice/tiny-lm'" in source and "LOCAL = False" in source
    meta = _front_matter(space / "README.md")
    assert meta["models"] == ["alice/tiny-lm"] and meta["title"] == "tiny-lm"
    assert "https://huggingface.co/alice/tiny-lm" in (space / "README.md").read_text()


def test_write_space_refusals_leave_nothing_behind(lm_dir, tmp_path, monkeypatch):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        write_space(lm_dir, tmp_path / "taken")
    lmforge_format = tmp_path / "lmforge-export"
    lmforge_format.mkdir()
    (lmforge_format / "config.json").write_text(json.dumps({"n_layer": 2}))
    (lmforge_format / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="model_type"):
        write_space(lmforge_format, tmp_path / "space")
    with pytest.raises(FileNotFoundError):
        write_space(tmp_path / "nowhere", tmp_path / "space")
    with pytest.raises(HubError):
        write_space(lm_dir, tmp_path / "space", model_repo_id="not a repo")

    def broken_copy(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hub.shutil, "copytree", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        write_space(lm_dir, tmp_path / "space")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lmforge-export", "taken"]


def test_export_command_pushes_and_writes_a_space(fake_hub, tmp_path, monkeypatch, capsys):
    """``lmforge export --format hf --push-to-hub ... --private --space DIR``, end to end on the fake Hub."""
    import lmforge
    from lmforge import cli
    from lmforge.model import GPT, GPTConfig

    config = GPTConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=16)
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in GPT(config).state_dict().items()},
        "lmforge": {"version": lmforge.__version__, "model_config": config.to_dict(), "tokenizer": {"type": "bytes"}},
    }
    torch.save(ckpt, tmp_path / "tiny.ckpt")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out, space = tmp_path / "hf-out", tmp_path / "space"
    cli.main(
        ["export", str(tmp_path / "tiny.ckpt"), "--to", str(out), "--format", "hf"]
        + ["--push-to-hub", "alice/tiny", "--private", "--space", str(space)]
    )
    pushed = {path for (repo, _, path) in fake_hub.files if repo == "alice/tiny"}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= pushed
    created = fake_hub.repos["alice/tiny"]
    assert created.get("private") is True or created.get("visibility") == "private"
    assert (space / "app.py").is_file() and "alice/tiny" in (space / "app.py").read_text()
    printed = capsys.readouterr()
    assert TOKEN not in printed.out + printed.err and "pushed" in printed.out
