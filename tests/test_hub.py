"""push_to_hub: the upload calls huggingface_hub makes (HfApi replaced: no network), and the token's secrecy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import huggingface_hub
import pytest

import fastsave
from fastsave.hub import upload_directory
from fastsave.options import parse_options
from fastsave.tiny import attach_lora, build_tiny_tokenizer, load_4bit, save_random_model, tiny_llama_config

TOKEN = "hf_fastsaveTESTtokenNeverPrinted0123456789"


class FakeHfApi:
    """Records every call; answers like huggingface_hub does, without a network."""

    calls: ClassVar[list[tuple[str, dict]]] = []
    tokens: ClassVar[list[str | None]] = []

    def __init__(self, token=None, **kwargs):
        FakeHfApi.tokens.append(token)

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        FakeHfApi.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])  # uploaded after the local save is complete
        assert (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()
        pr_url = (
            f"https://huggingface.co/{kwargs['repo_id']}/discussions/1" if kwargs.get("create_pr") else None
        )
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc",
            commit_message=kwargs.get("commit_message") or "",
            commit_description="",
            oid="abc",
            pr_url=pr_url,
        )


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHfApi.calls = []
    FakeHfApi.tokens = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    base = save_random_model(tiny_llama_config(), tmp_path_factory.mktemp("hub") / "base", seed=5)
    return attach_lora(load_4bit(base)), build_tiny_tokenizer()


def _no_token_anywhere(root: Path, text: str) -> None:
    assert TOKEN not in text
    for path in root.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_push_after_save(model_and_tokenizer, fake_hub, tmp_path, capfd, fastsave_log):
    model, tokenizer = model_and_tokenizer
    url = fastsave.save_pretrained_merged(
        model,
        tmp_path / "out",
        tokenizer,
        push_to_hub=True,
        repo_id="someone/tiny-merged",
        token=TOKEN,
        private=True,
        revision="v1",
        commit_message="merged with fastsave",
    )
    assert url == "https://huggingface.co/someone/tiny-merged"
    assert fake_hub.tokens == [TOKEN]
    assert fake_hub.calls == [
        ("create_repo", {"repo_id": "someone/tiny-merged", "private": True, "exist_ok": True}),
        ("create_branch", {"repo_id": "someone/tiny-merged", "branch": "v1", "exist_ok": True}),
        (
            "upload_folder",
            {
                "folder_path": str(tmp_path / "out"),
                "repo_id": "someone/tiny-merged",
                "revision": "v1",
                "commit_message": "merged with fastsave",
                "create_pr": False,
            },
        ),
    ]
    captured = capfd.readouterr()
    assert any("someone/tiny-merged" in line for line in fastsave_log.messages)
    _no_token_anywhere(tmp_path, captured.out + captured.err + fastsave_log.text)


def test_repo_id_defaults_to_save_directory_and_pr_url(
    model_and_tokenizer, fake_hub, tmp_path, monkeypatch, capfd
):
    model, _ = model_and_tokenizer
    monkeypatch.chdir(tmp_path)
    url = fastsave.save_pretrained_merged(
        model, "me/tiny", save_method="lora", push_to_hub=True, token=TOKEN, create_pr=True
    )
    assert url == "https://huggingface.co/me/tiny/discussions/1"
    create, upload = fake_hub.calls
    assert create == ("create_repo", {"repo_id": "me/tiny", "private": None, "exist_ok": True})
    assert upload[1]["repo_id"] == "me/tiny" and upload[1]["create_pr"] is True
    assert upload[1]["revision"] is None and upload[1]["commit_message"]
    assert (tmp_path / "me" / "tiny" / "adapter_config.json").is_file()
    captured = capfd.readouterr()
    _no_token_anywhere(tmp_path, captured.out + captured.err)


def test_token_not_in_options_repr(tmp_path):
    opts = parse_options(tmp_path / "x", push_to_hub=True, token=TOKEN)
    assert TOKEN not in repr(opts)


def test_upload_directory_alone(fake_hub, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    opts = parse_options(tmp_path / "ckpt", repo_id="org/name", push_to_hub=True)
    assert upload_directory(opts) == "https://huggingface.co/org/name"
    assert fake_hub.tokens == [None]  # no token given: huggingface_hub's own login is used
    assert [name for name, _ in fake_hub.calls] == ["create_repo", "upload_folder"]


def test_upload_error_propagates_without_the_token(fake_hub, tmp_path, monkeypatch, fastsave_log):
    def refuse(self, **kwargs):
        raise PermissionError("401 Unauthorized")

    monkeypatch.setattr(FakeHfApi, "upload_folder", refuse)
    (tmp_path / "ckpt").mkdir()
    opts = parse_options(tmp_path / "ckpt", repo_id="org/name", push_to_hub=True, token=TOKEN)
    with pytest.raises(PermissionError) as error:
        upload_directory(opts)
    _no_token_anywhere(tmp_path, str(error.value) + fastsave_log.text)


class _RecordingHub:
    """A fake HfApi: pre-uploads (LFS for .safetensors, regular otherwise, as the hub decides by
    kind), one commit; records every call and the bytes it received, and how many shards the
    local disk held at each pre-upload."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.preuploaded: dict[str, bytes] = {}
        self.shards_on_disk: list[int] = []
        self.commits: list[dict] = []

    def api(self):
        hub = self

        class FakeHfApi:
            def __init__(self, token=None, **kwargs):
                pass

            def create_repo(self, repo_id, **kwargs):
                import huggingface_hub

                return huggingface_hub.RepoUrl(f"https://huggingface.co/someone/{repo_id.split('/')[-1]}")

            def preupload_lfs_files(self, repo_id, additions, **kwargs):
                for operation in additions:
                    path = Path(operation.path_or_fileobj)
                    hub.shards_on_disk.append(len(list(path.parent.glob("*.safetensors"))))
                    if hub.fail_after is not None and len(hub.preuploaded) >= hub.fail_after:
                        raise ConnectionError("the network went away")
                    hub.preuploaded[operation.path_in_repo] = path.read_bytes()
                    operation._upload_mode = "lfs"
                    operation._is_uploaded = True

            def create_commit(self, repo_id, operations, **kwargs):
                files = {}
                for operation in operations:
                    if operation._is_uploaded:
                        files[operation.path_in_repo] = hub.preuploaded[operation.path_in_repo]
                    else:
                        files[operation.path_in_repo] = Path(operation.path_or_fileobj).read_bytes()
                hub.commits.append({"files": files, **kwargs})
                return type("Commit", (), {"pr_url": None})()

        return FakeHfApi


@pytest.mark.parametrize("save_method", ["merged_16bit", "fp8"])
def test_low_disk_space_usage_uploads_shard_by_shard_and_commits_once(
    qlora_model, tiny_tokenizer, tmp_path, monkeypatch, save_method
):
    import huggingface_hub

    hub = _RecordingHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api())
    monkeypatch.chdir(tmp_path)
    model = fastsave.patch(qlora_model())
    model.push_to_hub_merged(
        "tiny", tiny_tokenizer, save_method, max_shard_size="60KB", low_disk_space_usage=True
    )
    fastsave.save_pretrained_merged(
        model, tmp_path / "tiny", tiny_tokenizer, save_method=save_method, max_shard_size="60KB"
    )
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert ("quantization_config" in config) == (save_method == "fp8")  # a compressed-tensors checkpoint

    ((commit,),) = [hub.commits]
    local = {p.name: p.read_bytes() for p in (tmp_path / "tiny").iterdir()}
    shards = sorted(name for name in local if name.endswith(".safetensors"))
    assert len(shards) >= 3
    assert sorted(hub.preuploaded) == shards  # every shard pre-uploaded, nothing else
    assert max(hub.shards_on_disk) <= 2  # never more than two shards on the local disk
    for name, data in local.items():  # the commit holds exactly what a local save writes
        assert commit["files"][name] == data, name
    assert set(commit["files"]) == set(local)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # the local save; the push left nothing
    fastsave.unpatch(model)


def test_low_disk_space_usage_failure_commits_nothing(qlora_model, tiny_tokenizer, tmp_path, monkeypatch):
    import huggingface_hub

    hub = _RecordingHub(fail_after=1)
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConnectionError):
        fastsave.api.push_to_hub_merged(
            qlora_model(), "tiny", tiny_tokenizer, max_shard_size="60KB", low_disk_space_usage=True
        )
    assert hub.commits == []
    assert list(tmp_path.iterdir()) == []
