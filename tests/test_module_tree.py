"""fastsave's module walk gives torch's own named_modules order, and prunes only what it is told to."""

from __future__ import annotations

from torch import nn

from fastsave.adapters.live_peft import is_lora_factor_container, lora_module_census
from fastsave.module_tree import named_modules
from fastsave.tiny import attach_lora, load_4bit


def _model_with_shared_modules() -> nn.Module:
    shared = nn.Linear(3, 3)
    root = nn.Module()
    root.a = nn.Sequential(nn.Linear(3, 3), shared, None)  # a None child is skipped, as torch does
    root.b = nn.ModuleDict({"x": shared, "y": nn.Sequential(nn.ReLU(), shared)})
    root.c = shared
    return root


def test_same_order_and_names_as_torch_with_and_without_duplicates():
    root = _model_with_shared_modules()
    for remove_duplicate in (True, False):
        expected = [(n, id(m)) for n, m in root.named_modules(remove_duplicate=remove_duplicate)]
        got = [(n, id(m)) for n, m in named_modules(root, remove_duplicate=remove_duplicate)]
        assert got == expected


def test_on_a_peft_model(tiny_base_dir):
    model = attach_lora(load_4bit(tiny_base_dir))
    assert [n for n, _ in named_modules(model)] == [n for n, _ in model.named_modules()]
    pruned = [n for n, _ in named_modules(model, skip_child=is_lora_factor_container)]
    everything = [n for n, _ in model.named_modules()]
    # only the containers of factors (and what they hold) are left out, in the same order
    assert pruned == [n for n in everything if ".lora_" not in n]
    assert len(pruned) < len(everything)


def test_stop_below_yields_the_module_not_its_descendants():
    root = _model_with_shared_modules()
    names = [n for n, _ in named_modules(root, stop_below=lambda m: isinstance(m, nn.ModuleDict))]
    assert "b" in names and not any(n.startswith("b.") for n in names)


def test_census_finds_every_lora_layer(tiny_base_dir):
    """The census (pruned walk) against a plain scan of torch's named_modules."""
    model = attach_lora(load_4bit(tiny_base_dir), target_modules=["q_proj", "v_proj", "embed_tokens"])
    expected = [
        n
        for n, m in model.named_modules()
        if (isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and len(m.lora_A))
        or (isinstance(getattr(m, "lora_embedding_A", None), nn.ParameterDict) and len(m.lora_embedding_A))
    ]
    assert lora_module_census(model, None) == expected


def test_census_pass_finds_the_tied_parameters_torch_names_twice(tmp_path):
    """The census pass also collects tied weights: every parameter torch reaches under more than one
    name (named_parameters without removing duplicates), and nothing else; the census is unchanged."""
    from fastsave.tiny import save_random_model, tiny_llama_config

    base = save_random_model(tiny_llama_config(tie_word_embeddings=True), tmp_path / "tied")
    model = attach_lora(load_4bit(base), target_modules=["q_proj", "v_proj"])
    model.base_model.model.model.layers[1].mlp.shared_gate = model.base_model.model.model.layers[
        0
    ].mlp.gate_proj
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    expected = {key for key, count in counts.items() if count > 1}
    tied: set[int] = set()
    assert lora_module_census(model, None, tied) == lora_module_census(model, None)
    assert tied == expected
    assert len(expected) == 2  # the tied embedding / lm_head, and the shared gate_proj's weight
