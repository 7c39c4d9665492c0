"""save_pretrained_gguf / push_to_hub_gguf with llama.cpp's own converter (from llama-cpp-python's sdist).

Oracles: llama.cpp's gguf reader (gguf-py) reads the files back; the merged weights are
bitsandbytes' float32 dequantize + peft's own delta.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import bitsandbytes.functional as bnb_functional
import huggingface_hub
import numpy as np
import pytest
import torch
from gguf_tools import write_fake_quantize

import fastsave
from fastsave.errors import DiskSpaceError
from fastsave.export import space
from fastsave.export.llama_cpp import LlamaCppNotFoundError
from fastsave.export.verify import CheckpointFacts, GGUFVerificationError, verify_gguf
from fastsave.io.model_card import MODEL_CARD_MARKER
from fastsave.tiny import (
    attach_lora,
    build_sentencepiece_tokenizer,
    load_4bit,
    save_random_model,
    tiny_llama_config,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# llama.cpp tensor name -> checkpoint name, for the tensors its converter does not permute.
UNPERMUTED = {
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


@torch.no_grad()
def _float32_oracle(layer) -> torch.Tensor:
    base = layer.get_base_layer()
    state = copy.deepcopy(base.weight.quant_state)
    state.dtype = torch.float32
    weight = bnb_functional.dequantize_4bit(base.weight.data.view(torch.uint8), state)
    return weight + layer.get_delta_weight("default").float()


def _layers(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A")}


def test_default_q8_0_next_to_the_users_readme(spm_base, llama_cpp, gguf, tmp_path, fastsave_log):
    base, tokenizer = spm_base
    model = fastsave.patch(attach_lora(load_4bit(base)))
    out = tmp_path / "model_gguf"
    out.mkdir()
    (out / "README.md").write_text("my own notes\n")
    result = model.save_pretrained_gguf(out, tokenizer, llama_cpp=llama_cpp)  # Unsloth's default method

    paths = result["gguf_files"]  # the method returns what Unsloth's returns
    assert paths == [str(out / "tiny-llama.Q8_0.gguf")]  # "-bnb-4bit" dropped, as Unsloth names it
    assert result["save_directory"] == result["gguf_directory"] == str(out)
    assert result["want_full_precision"] is False and result["modelfile_location"] is None
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "tiny-llama.Q8_0.gguf"]
    assert (out / "README.md").read_text() == "my own notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_gguf"]  # no temporary checkpoint left
    assert any("kept" in line and "README.md" in line for line in fastsave_log.messages)
    summary = next(line for line in fastsave_log.messages if line.startswith("fastsave: GGUF export"))
    assert "tiny-llama.Q8_0.gguf" in summary and "MB" in summary

    reader = gguf.GGUFReader(paths[0])
    assert gguf.LlamaFileType(reader.fields["general.file_type"].contents()).name == "MOSTLY_Q8_0"
    assert len(reader.tensors) == 21  # the checkpoint's 21 tensors, lm_head untied
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 300
    # The file holds the merged weights, not the base: q8_0 of the merge is far closer to the merge.
    tensors = {t.name: t for t in reader.tensors}
    layer = _layers(model)["model.layers.1.mlp.down_proj"]
    merged = _float32_oracle(layer).numpy()
    base_only = merged - layer.get_delta_weight("default").detach().float().numpy()
    got = gguf.dequantize(tensors["blk.1.ffn_down.weight"].data, tensors["blk.1.ffn_down.weight"].tensor_type)
    got = got.reshape(merged.shape)
    assert np.abs(got - merged).max() < 0.05 * np.abs(got - base_only).max()

    facts = CheckpointFacts({"model.embed_tokens.weight": (300, 64)}, vocab_size=301, num_layers=2)
    with pytest.raises(GGUFVerificationError, match="vocab_size=301"):
        verify_gguf(Path(paths[0]), facts, gguf)


TOKEN = "hf_fastsaveGGUFtestTokenNeverWritten0123"


def test_f32_pushed_from_a_temporary_directory_is_the_exact_merge(spm_base, llama_cpp, gguf, monkeypatch):
    base, tokenizer = spm_base
    model = attach_lora(load_4bit(base))
    expected = {name + ".weight": _float32_oracle(layer) for name, layer in _layers(model).items()}
    uploads = []

    class FakeHfApi:
        def __init__(self, token=None, **kwargs):
            assert token == TOKEN

        def create_repo(self, repo_id, **kwargs):
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, folder_path, **kwargs):
            folder = Path(folder_path)
            files = sorted(p.name for p in folder.iterdir())
            reader = gguf.GGUFReader(str(folder / "tiny-llama.F32.gguf"))
            tensors = {
                t.name: np.array(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors
            }
            uploads.append((folder, files, (folder / "README.md").read_text(), tensors, kwargs))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    url = fastsave.push_to_hub_gguf(
        model,
        "someone/tiny-gguf",
        tokenizer,
        "f32",
        llama_cpp=llama_cpp,
        token=TOKEN,
        tags=["my-tag"],
        datasets=["someone/data"],
        commit_description="float32 GGUF",
    )
    assert url == "https://huggingface.co/someone/tiny-gguf"
    ((folder, files, card, tensors, kwargs),) = uploads
    assert not folder.exists()  # use_temp_dir=None: a temporary directory, removed after the upload
    assert files == ["README.md", "tiny-llama.F32.gguf"]
    assert kwargs["commit_description"] == "float32 GGUF"
    metadata = huggingface_hub.ModelCard(card).data
    assert MODEL_CARD_MARKER in card and "my-tag" in metadata.tags and "gguf" in metadata.tags
    assert metadata.datasets == ["someone/data"] and "F32" in card
    compared = 0
    for i in range(2):
        for gguf_name, hf_name in UNPERMUTED.items():
            reference = expected[hf_name.format(i=i)].numpy()
            assert np.array_equal(tensors[gguf_name.format(i=i)], reference), gguf_name.format(i=i)
            compared += 1
    assert compared == 10


def test_k_quants_go_through_llama_quantize_after_the_checkpoint_is_gone(
    spm_base, llama_cpp, gguf, tmp_path, monkeypatch
):
    base, tokenizer = spm_base
    tools = tmp_path / "bin"
    tools.mkdir()
    monkeypatch.setenv("FASTSAVE_LLAMA_QUANTIZE", str(write_fake_quantize(tools)))
    out = tmp_path / "out"
    paths = fastsave.save_pretrained_gguf(
        attach_lora(load_4bit(base)), out, tokenizer, ["not_quantized", "Q4_K_M"], llama_cpp=llama_cpp
    )
    assert paths == [str(out / "tiny-llama.BF16.gguf"), str(out / "tiny-llama.Q4_K_M.gguf")]
    (call,) = [json.loads(line) for line in (tools / "calls.jsonl").read_text().splitlines()]
    source, target, kind = call["argv"][-4:-1]
    assert Path(source).name == "tiny-llama.BF16.gguf" and Path(target).name == "tiny-llama.Q4_K_M.gguf"
    assert kind == "Q4_K_M"
    assert call["beside"] == ["tiny-llama.BF16.gguf"]  # the 16-bit checkpoint was removed first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "out"]
    assert MODEL_CARD_MARKER in (out / "README.md").read_text()


def test_no_llama_cpp_is_a_clear_error_before_any_work(qlora_model, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("FASTSAVE_LLAMA_CPP", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LlamaCppNotFoundError, match="git clone") as error:
        fastsave.save_pretrained_gguf(qlora_model(), "out", tiny_tokenizer)
    assert "FASTSAVE_LLAMA_CPP" in str(error.value) and "never downloads" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_k_quant_without_llama_quantize_is_refused_before_any_work(
    qlora_model, tiny_tokenizer, llama_cpp, tmp_path, monkeypatch
):
    monkeypatch.delenv("FASTSAVE_LLAMA_QUANTIZE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(LlamaCppNotFoundError, match="llama-quantize"):
        fastsave.save_pretrained_gguf(
            qlora_model(), tmp_path / "out", tiny_tokenizer, "quantized", llama_cpp=llama_cpp
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("route", ["fed", "checkpoint"])
def test_disk_space_for_checkpoint_and_gguf_is_checked_first(
    qlora_model, tiny_tokenizer, llama_cpp, tmp_path, monkeypatch, route
):
    """The space the export needs is checked before any work: the GGUF alone when the converter is
    fed from the merge, the temporary 16-bit checkpoint too on the checkpoint route."""
    from fastsave.export import feed

    if route == "checkpoint":
        monkeypatch.setattr(
            feed, "_converter", lambda tools: (_ for _ in ()).throw(feed.FeedUnavailable("forced"))
        )
    sizes = []
    real_check = space.check_export_space

    def recording(*args, **kwargs):
        sizes.append(args[1])  # the checkpoint's bytes per weight
        return real_check(*args, **kwargs)

    real = space.shutil.disk_usage
    monkeypatch.setattr(space.shutil, "disk_usage", lambda path: real(path)._replace(free=10**6))
    monkeypatch.setattr("fastsave.export.save_gguf.check_export_space", recording)
    words = "temporary 16-bit checkpoint" if route == "checkpoint" else r"\(the GGUF file\(s\)"
    with pytest.raises(DiskSpaceError, match=words):
        fastsave.save_pretrained_gguf(qlora_model(), tmp_path / "out", tiny_tokenizer, llama_cpp=llama_cpp)
    assert sizes == [0 if route == "fed" else 2]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "words"),
    [
        ((), {}, ValueError, "tokenizer"),
        ((True, "q9_9"), {}, ValueError, "unknown"),
        ((True, "iq2_xs"), {}, ValueError, "imatrix_file"),
        ((True, "q4_k_m"), {"save_method": "lora"}, ValueError, "f32, f16, bf16, q8_0"),
        ((True,), {"first_conversion": "q4_k_m"}, ValueError, "first_conversion"),
        ((True, "iq2_xs"), {"imatrix_file": True}, ValueError, "never downloads"),
        ((True,), {"bogus": 1}, TypeError, "bogus"),
    ],
)
def test_invalid_requests_are_refused_before_any_work(
    qlora_model, tiny_tokenizer, tmp_path, args, kwargs, error, words
):
    positional = [tiny_tokenizer if args and args[0] is True else None, *args[1:]]
    with pytest.raises(error, match=words):
        fastsave.save_pretrained_gguf(qlora_model(), tmp_path / "out", *positional, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_fetching_the_converter_skips_only_when_the_registry_is_unreachable():
    from gguf_tools import registry_unreachable

    offline = (
        "WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after connection "
        "broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object>: Failed to "
        "establish a new connection: [Errno -3] Temporary failure in name resolution')'\n"
        "ERROR: No matching distribution found for llama-cpp-python==0.3.36"
    )
    wrong_version = (
        "ERROR: Could not find a version that satisfies the requirement llama-cpp-python==0.0.0\n"
        "ERROR: No matching distribution found for llama-cpp-python==0.0.0"
    )
    assert registry_unreachable(offline)
    assert not registry_unreachable(wrong_version)
    assert not registry_unreachable(
        "ERROR: Exception: Traceback ... OSError: [Errno 28] No space left on device"
    )


def test_added_tokens_reach_the_gguf(tmp_path, llama_cpp, gguf):
    """Chat tokens added, the embeddings resized and trained with peft's trainable tokens: the GGUF
    holds the new tokens under their ids, the merged rows, and a vocabulary of the embedding's size."""
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    save_random_model(tiny_llama_config(vocab_size=300), base)
    build_sentencepiece_tokenizer(base)  # llama.cpp's converter reads a sentencepiece vocabulary here
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    model = load_4bit(base)
    model.resize_token_embeddings(len(tokenizer))
    new_ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    model = attach_lora(model, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": new_ids})
    trained = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].copy_(
            trained
        )

    (path,) = fastsave.save_pretrained_gguf(model, tmp_path / "out", tokenizer, "f32", llama_cpp=llama_cpp)
    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == len(tokenizer)
    assert [tokens[i] for i in new_ids] == ["<|im_start|>", "<|im_end|>"]
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert all(gguf.TokenType(types[i]) == gguf.TokenType.CONTROL for i in new_ids)
    embedding = {t.name: t for t in reader.tensors}["token_embd.weight"]
    rows = np.asarray(embedding.data).reshape(len(tokenizer), 64)
    assert np.array_equal(rows[new_ids], trained.numpy())  # f32: the trained rows, exactly


@pytest.mark.parametrize("method", ["f32", "bf16", "q8_0"])
def test_gguf_straight_from_the_merge_is_the_checkpoint_routes_file(
    spm_base, llama_cpp, tmp_path, monkeypatch, method
):
    """llama.cpp's converter fed from the plan writes, byte for byte, the file it writes from the
    16-bit checkpoint; and on that route no weight file is ever written, only config and tokenizer."""
    from fastsave.export import feed, save_gguf

    base, tokenizer = spm_base
    model = attach_lora(load_4bit(base), seed=2)
    staged_during_conversion = []
    real = save_gguf.convert_from_plan

    def spy(tools, staged, plan, outfile, outtype, split_max_size=0):
        staged_during_conversion.extend(sorted(p.name for p in staged.iterdir()))
        return real(tools, staged, plan, outfile, outtype, split_max_size)

    monkeypatch.setattr(save_gguf, "convert_from_plan", spy)
    import fastsave.pipeline.write

    monkeypatch.setattr(
        fastsave.pipeline.write, "write_merged_weights", None
    )  # the fed route writes no weights
    (fed,) = fastsave.save_pretrained_gguf(model, tmp_path / "fed", tokenizer, method, llama_cpp=llama_cpp)
    assert staged_during_conversion and not [
        n for n in staged_during_conversion if n.endswith((".safetensors", ".bin"))
    ]
    assert "config.json" in staged_during_conversion and "tokenizer.model" in staged_during_conversion
    monkeypatch.undo()

    monkeypatch.setattr(
        feed, "_converter", lambda tools: (_ for _ in ()).throw(feed.FeedUnavailable("forced"))
    )
    (from_checkpoint,) = fastsave.save_pretrained_gguf(
        model, tmp_path / "ckpt", tokenizer, method, llama_cpp=llama_cpp
    )
    assert Path(fed).read_bytes() == Path(from_checkpoint).read_bytes()


def test_gguf_falls_back_to_the_checkpoint_route_saying_why(
    spm_base, llama_cpp, tmp_path, monkeypatch, fastsave_log
):
    from fastsave.export import feed

    base, tokenizer = spm_base

    def unavailable(tools):
        raise feed.FeedUnavailable("llama.cpp's converter at X has no ModelBase.index_tensors")

    monkeypatch.setattr(feed, "_converter", unavailable)
    (path,) = fastsave.save_pretrained_gguf(
        attach_lora(load_4bit(base)), tmp_path / "out", tokenizer, "f16", llama_cpp=llama_cpp
    )
    assert Path(path).is_file()
    assert any(
        "no ModelBase.index_tensors; converting from a temporary 16-bit checkpoint instead" in line
        for line in fastsave_log.messages
    )


def test_a_nan_reaches_no_gguf_on_the_fed_route(spm_base, llama_cpp, tmp_path):
    base, tokenizer = spm_base
    model = attach_lora(load_4bit(base))
    with torch.no_grad():
        model.base_model.model.model.layers[1].mlp.up_proj.lora_B["default"].weight[3, 0] = float("nan")
    with pytest.raises(Exception, match=r"up_proj\.weight.*NaN"):
        fastsave.save_pretrained_gguf(model, tmp_path / "out", tokenizer, "f16", llama_cpp=llama_cpp)
    assert not (tmp_path / "out").exists()


def test_gguf_shard_size_writes_llama_cpps_split_layout(spm_base, llama_cpp, gguf, tmp_path):
    """A forced small gguf_shard_size: parts named <name>-0000i-of-0000N.gguf, the metadata in the
    first, every tensor once across them, the same tensors as the one-file export."""
    base, tokenizer = spm_base
    model = attach_lora(load_4bit(base), seed=6)
    (whole,) = fastsave.save_pretrained_gguf(model, tmp_path / "whole", tokenizer, "f32", llama_cpp=llama_cpp)
    parts = fastsave.save_pretrained_gguf(
        model, tmp_path / "split", tokenizer, "f32", llama_cpp=llama_cpp, gguf_shard_size="100KB"
    )
    count = len(parts)
    assert count >= 3
    assert [Path(p).name for p in parts] == [
        f"tiny-llama.F32-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)
    ]
    readers = [gguf.GGUFReader(p) for p in parts]
    assert readers[0].fields["split.count"].contents() == count
    assert all(sum(t.n_bytes for t in r.tensors) <= 100_000 or len(r.tensors) == 1 for r in readers)
    split = {t.name: np.asarray(t.data).copy() for r in readers for t in r.tensors}
    one = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(whole).tensors}
    assert split.keys() == one.keys() and all(np.array_equal(split[k], one[k]) for k in one)


def test_gguf_shard_size_with_a_k_quant_is_refused_first(qlora_model, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="gguf-split"):
        fastsave.save_pretrained_gguf(
            qlora_model(), tmp_path / "out", tiny_tokenizer, "q4_k_m", gguf_shard_size="1GB"
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.llama_runtime
def test_real_k_quants_from_one_merge(llama_cpp, gguf, tmp_path, monkeypatch):
    """llama-quantize built from llama.cpp's sources: q8_0, q4_k_m and q5_k_m from one merge and one
    conversion; each file loads with gguf and its block weights have the types asked for (k-quants
    need rows of 256: a model of hidden size 256)."""
    from gguf_tools import built_llama_quantize

    monkeypatch.setenv("FASTSAVE_LLAMA_QUANTIZE", str(built_llama_quantize()))
    base = tmp_path / "tiny-llama-256"
    save_random_model(tiny_llama_config(vocab_size=300, hidden_size=256, intermediate_size=512), base)
    tokenizer = build_sentencepiece_tokenizer(base)
    model = attach_lora(load_4bit(base), seed=7)
    paths = fastsave.save_pretrained_gguf(
        model, tmp_path / "out", tokenizer, ["q8_0", "q4_k_m", "q5_k_m"], llama_cpp=llama_cpp
    )
    names = ["tiny-llama-256.Q8_0.gguf", "tiny-llama-256.Q4_K_M.gguf", "tiny-llama-256.Q5_K_M.gguf"]
    assert [Path(p).name for p in paths] == names
    expected = {"MOSTLY_Q8_0": {"Q8_0"}, "MOSTLY_Q4_K_M": {"Q4_K", "Q6_K"}, "MOSTLY_Q5_K_M": {"Q5_K", "Q6_K"}}
    for path, (kind, allowed) in zip(paths, expected.items(), strict=True):
        reader = gguf.GGUFReader(path)
        assert gguf.LlamaFileType(reader.fields["general.file_type"].contents()).name == kind
        block_weights = {
            t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2
        }
        assert block_weights <= allowed and sorted(allowed)[0] in block_weights, (kind, block_weights)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*names, "README.md"])
    # first_conversion="q8_0": llama-quantize reads the q8_0 file (the disk holds 8.5 + 4.9 bits a weight)
    (path,) = fastsave.save_pretrained_gguf(
        model, tmp_path / "from-q8", tokenizer, "q4_k_m", first_conversion="q8_0", llama_cpp=llama_cpp
    )
    assert (
        gguf.LlamaFileType(gguf.GGUFReader(path).fields["general.file_type"].contents()).name
        == "MOSTLY_Q4_K_M"
    )


@pytest.mark.llama_runtime
def test_llama_cpp_loads_a_split_gguf_as_one_model(spm_base, llama_cpp, tmp_path):
    """llama.cpp itself (llama-cpp-python) loads the first part of a split GGUF as the whole model:
    the same logits as the one-file GGUF."""
    llama = pytest.importorskip(
        "llama_cpp", reason="scripts/test_llama_cpp_runtime.sh installs llama-cpp-python"
    )
    base, tokenizer = spm_base
    model = attach_lora(load_4bit(base), seed=6)
    (whole,) = fastsave.save_pretrained_gguf(model, tmp_path / "whole", tokenizer, "f32", llama_cpp=llama_cpp)
    parts = fastsave.save_pretrained_gguf(
        model, tmp_path / "split", tokenizer, "f32", llama_cpp=llama_cpp, gguf_shard_size="100KB"
    )
    assert len(parts) >= 3

    def logits(path):
        runner = llama.Llama(model_path=path, logits_all=True, n_ctx=64, verbose=False)
        ids = runner.tokenize(b"the quick brown fox jumps over the lazy dog")
        runner.eval(ids)
        return np.asarray(runner.scores[: len(ids)])

    assert np.array_equal(logits(parts[0]), logits(whole))
