"""Adapters on tiny randomly initialised models of each family, and on the real model."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

from editing.adapters import UnsupportedModelError, adapter_for
from editing.editor import Editor
from editing.facts import Fact
from editing.hparams import EditHparams
from editing.models import LoadedModel, with_cache
from editing.tracing import Trace, instrument
from editing.zstar import compute_zstar

VOCAB = 49152  # the real tokenizer's, so that the tiny models can run a real edit
HIDDEN, INNER = 32, 64

CONFIGS: dict[str, PretrainedConfig] = {
    "llama": LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INNER,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "qwen2": Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INNER,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "mistral": MistralConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INNER,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "gemma": GemmaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INNER,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    ),
    # Gemma 2 and 3 normalise the MLP output before the residual add, and attend within a
    # sliding window on some layers: a window of 4 makes the tiny models use it.
    "gemma2": Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INNER,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
    ),
    "gemma3_text": Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INNER,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    "gpt2": GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INNER, n_layer=3, n_head=4, n_positions=128
    ),
    "gptj": GPTJConfig(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_inner=INNER,
        n_layer=3,
        n_head=4,
        rotary_dim=4,
        n_positions=128,
    ),
    "gpt_neox": GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INNER,
        num_hidden_layers=3,
        num_attention_heads=4,
    ),
}


def _tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[family])
    model.eval().requires_grad_(False)
    return model


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_adapter_reads_and_writes_the_mlp_output_matrix(family: str) -> None:
    model = _tiny(family)
    adapter = adapter_for(model)
    assert adapter.shape(model, 1) == (HIDDEN, INNER)
    weight = adapter.read(model, 1)
    assert weight.shape == (HIDDEN, INNER)
    adapter.write(model, 1, weight * 2)
    assert torch.equal(adapter.read(model, 1), weight * 2)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_traced_weights_equal_written_weights(family: str) -> None:
    """A forward with an override weight equals one with that weight installed: this checks the
    orientation (GPT-2's Conv1D is transposed) and that keys are the matrix's input."""
    model = _tiny(family)
    adapter = adapter_for(model)
    instrument(model, adapter)
    ids = torch.randint(0, 1000, (2, 7))
    new = adapter.read(model, 1) + 0.5 * torch.randn(HIDDEN, INNER)
    with Trace(capture_inputs=frozenset({1}), weights={1: new}) as trace:
        traced = model(input_ids=ids).logits
    assert trace.inputs[1].shape == (2, 7, INNER)
    adapter.write(model, 1, new)
    assert torch.allclose(model(input_ids=ids).logits, traced, atol=1e-5)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_the_kv_cache_goes_under_the_forwards_own_keyword(family: str) -> None:
    """The cache reaches the forward (it fills), under no deprecated keyword."""
    model = _tiny(family)
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model(input_ids=torch.randint(0, 1000, (2, 7)), use_cache=True, **with_cache(model, cache))
    assert cache.get_seq_length() == 7


def test_a_forward_of_older_transformers_gets_past_key_values() -> None:
    class Older(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):  # type: ignore[no-untyped-def]
            return past_key_values

    assert with_cache(Older(), "the cache") == {"past_key_values": "the cache"}


@pytest.mark.parametrize("method", ["d4s", "memory"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_edit_and_revert_on_a_tiny_model(family: str, method: str, lm: LoadedModel) -> None:
    """The whole engine runs on every family, the weights' method and the keyed memory's;
    reverting restores the served model bit for bit. Where a norm follows the MLP output, the
    weight methods, whose solve assumes it is added as it is, refuse by name."""
    tiny = LoadedModel(spec=family, model=_tiny(family), tokenizer=lm.tokenizer)
    hp = EditHparams(layers=(0, 1), v_steps=4)
    c0 = {layer: torch.eye(INNER, dtype=torch.float64) for layer in hp.layers}
    if method == "d4s" and not adapter_for(tiny.model).output_is_added:
        with pytest.raises(UnsupportedModelError, match="post_feedforward_layernorm"):
            Editor(tiny, hp, method, c0=c0)
        return
    editor = Editor(tiny, hp, method, c0=c0)
    before = editor.digest()
    result = editor.apply([Fact("Eiffel Tower", "The Eiffel Tower is in", "Rome")])
    assert editor.digest() != before
    assert result.record.keys[0].shape == (1, INNER)
    editor.revert(result.record.id)
    assert editor.digest() == before


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_zstar_from_cached_prefixes_equals_zstar_over_whole_rows(
    family: str, lm: LoadedModel
) -> None:
    """The fast z* path (prefix keys and values cached, only the rows' remaining tokens run per
    step) gives what running the whole rows gives, on every family's attention and positions."""
    tiny = LoadedModel(spec=family, model=_tiny(family), tokenizer=lm.tokenizer)
    hp = EditHparams(layers=(0, 1), v_steps=6)
    facts = [
        Fact("Eiffel Tower", "The Eiffel Tower is in", "Rome"),
        Fact("Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "English"),
    ]
    fast = compute_zstar(tiny, facts, hp)
    whole = compute_zstar(tiny, facts, hp, reuse_prefix=False)
    assert fast.steps == whole.steps > 0
    assert torch.allclose(fast.residual, whole.residual, rtol=1e-4, atol=1e-6)
    assert fast.nll_before == pytest.approx(whole.nll_before, rel=1e-5)
    assert fast.nll_after == pytest.approx(whole.nll_after, rel=1e-4)


def test_unsupported_architecture_is_named() -> None:
    class Odd(torch.nn.Module):
        config = PretrainedConfig()

    with pytest.raises(UnsupportedModelError, match="model_type"):
        adapter_for(Odd())  # type: ignore[arg-type]


def test_real_model_edited_matrices(lm: LoadedModel) -> None:
    adapter = adapter_for(lm.model)
    assert adapter.family == "llama"
    assert adapter.num_layers(lm.model) == 30
    assert adapter.shape(lm.model, 3) == (576, 1536)
