"""glm_ext.model: GLM against an independent float64 implementation of the authors' layout."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch
from conftest import assert_within_pytorch_error

from glm_ext import model as model_module
from glm_ext import reference
from glm_ext.model import PRESETS, GLMConfig, GLMModel, KVCache, lm_loss, pad_vocab_size

BACKENDS = [
    ("sdpa", "fused"), ("sdpa", "reference"), ("fused", "fused"), ("fused", "reference"), ("reference", "fused"),
    ("reference", "reference"),
]
ENCODINGS = ["learned_2d", "rotary_2d"]


# ---------------------------------------------------------------------------------------------
# The authors' layout in plain float64 tensor maths (GLM_SPEC 2 and 3), keyed by their names.


def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def rotary_2d(x, position, block, base=10000.0):
    """Per head: quarter pairs (j, j + D/4) of the first half turn by position * base^(-4j/D),
    those of the second half by block position * the same frequencies."""
    head_dim = x.shape[-1]
    half, quarter = head_dim // 2, head_dim // 4
    freq = base ** (-4.0 * torch.arange(quarter, dtype=torch.float64) / head_dim)
    out = x.clone()
    for offset, ids in ((0, position), (half, block)):
        angle = ids.double()[..., None, None] * freq
        a, b = x[..., offset : offset + quarter], x[..., offset + quarter : offset + half]
        out[..., offset : offset + quarter] = a * angle.cos() - b * angle.sin()
        out[..., offset + quarter : offset + half] = b * angle.cos() + a * angle.sin()
    return out


def authors_logits(sd, config, input_ids, position_ids, sep):
    """Logits of the padded batch ``input_ids [b, s]`` from the authors' state dict ``sd``."""
    b, s = input_ids.shape
    heads, dim = config.num_heads, config.hidden_size // config.num_heads
    h = sd["word_embeddings.weight"][input_ids]
    if config.position_encoding == "learned_2d":
        h = h + sd["transformer.position_embeddings.weight"][position_ids[:, 0]]
        h = h + sd["transformer.block_position_embeddings.weight"][position_ids[:, 1]]
    i = torch.arange(s)
    allowed = (i[None, None, :] < sep[:, None, None]) | (i[None, None, :] <= i[None, :, None])  # [b, q, k]
    for layer in range(config.num_layers):
        p = f"transformer.layers.{layer}."
        x = layer_norm(h, sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"])
        qkv = x @ sd[p + "attention.query_key_value.weight"].T + sd[p + "attention.query_key_value.bias"]
        q, k, v = (qkv[..., n * heads * dim : (n + 1) * heads * dim].reshape(b, s, heads, dim) for n in range(3))
        if config.position_encoding == "rotary_2d":
            q, k = (rotary_2d(t, position_ids[:, 0], position_ids[:, 1]) for t in (q, k))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dim)
        probs = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
        context = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, heads * dim)
        h = h + context @ sd[p + "attention.dense.weight"].T + sd[p + "attention.dense.bias"]
        x = layer_norm(h, sd[p + "post_attention_layernorm.weight"], sd[p + "post_attention_layernorm.bias"])
        inner = gelu_tanh(x @ sd[p + "mlp.dense_h_to_4h.weight"].T + sd[p + "mlp.dense_h_to_4h.bias"])
        h = h + inner @ sd[p + "mlp.dense_4h_to_h.weight"].T + sd[p + "mlp.dense_4h_to_h.bias"]
    h = layer_norm(h, sd["transformer.final_layernorm.weight"], sd["transformer.final_layernorm.bias"])
    return h @ sd["word_embeddings.weight"].T


# ---------------------------------------------------------------------------------------------
# Helpers


def small_config(position_encoding="learned_2d", **overrides):
    fields = dict(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, max_sequence_length=20)
    return GLMConfig(**{**fields, **overrides}, position_encoding=position_encoding)


def random_model(config, dtype=torch.float64, attention="sdpa", embedding="fused", scale=0.3):
    """A model whose every parameter (LayerNorms and biases included) is random."""
    model = GLMModel(config, attention_backend=attention, embedding_backend=embedding).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
    return model


def random_inputs(config, batch, seq):
    """Random ids, random 2D positions over the whole tables, random sep in [0, seq]."""
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    positions = torch.randint(0, config.max_sequence_length + 1, (batch, 2, seq))
    sep = torch.randint(0, seq + 1, (batch,))
    return ids, positions, sep


def rel_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


# ---------------------------------------------------------------------------------------------
# Configuration


def test_presets_follow_the_spec():
    sizes = {
        "base": (12, 768, 12, 512), "large": (24, 1024, 16, 512), "410m": (30, 1024, 16, 512),
        "515m": (30, 1152, 18, 512), "2b": (36, 2048, 32, 1024), "10b": (48, 4096, 64, 1024),
        # not in the spec: from the authors' model_blocklm_{roberta_large,large_chinese,10B_chinese}.sh
        "roberta-large": (24, 1024, 16, 512), "large-chinese": (24, 1024, 16, 1024), "10b-chinese": (48, 4096, 64, 1024),
    }
    for name, (layers, hidden, heads, max_len) in sizes.items():
        c = GLMConfig.preset(name)
        assert (c.num_layers, c.hidden_size, c.num_heads, c.max_sequence_length) == (layers, hidden, heads, max_len)
        assert c.vocab_size % 128 == 0 and c.position_encoding == "learned_2d"
    assert GLMConfig.preset("2b").vocab_size == GLMConfig.preset("10b").vocab_size == 50304
    assert set(PRESETS) == set(sizes) | {"tiny"}


@pytest.mark.parametrize("name, billions", [("410m", 0.41), ("515m", 0.515), ("2b", 2.0), ("10b", 10.0)])
def test_preset_parameter_counts_match_their_names(name, billions):
    with torch.device("meta"):
        model = GLMModel(GLMConfig.preset(name))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e9 - billions) / billions < 0.12, count


def test_preset_overrides_pad_the_vocabulary():
    assert GLMConfig.preset("tiny", vocab_size=1000).vocab_size == 1024
    assert GLMConfig.preset("tiny", position_encoding="rotary_2d").position_encoding == "rotary_2d"
    assert pad_vocab_size(50265) == 50304 and pad_vocab_size(128) == 128


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(hidden_size=30), "multiple of num_heads"),
        (dict(num_layers=0), "num_layers must be a positive int"),
        (dict(position_encoding="alibi"), "position_encoding must be one of"),
        (dict(hidden_size=24, num_heads=4, position_encoding="rotary_2d"), "divisible by 4"),
    ],
)
def test_invalid_config(fields, match):
    with pytest.raises(ValueError, match=match):
        small_config(**fields)


def test_config_dict_round_trip_and_errors():
    config = small_config("rotary_2d")
    assert GLMConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown GLMConfig field.*dropout"):
        GLMConfig.from_dict({**config.to_dict(), "dropout": 0.1})
    with pytest.raises(ValueError, match="missing GLMConfig field.*num_heads"):
        GLMConfig.from_dict({k: v for k, v in config.to_dict().items() if k != "num_heads"})
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        GLMConfig.preset("huge")


# ---------------------------------------------------------------------------------------------
# Layout and initialisation


def spec_keys(num_layers, learned=True):
    """GLM_SPEC 3's list of the authors' state-dict keys."""
    keys = ["word_embeddings.weight"]
    if learned:
        keys += ["transformer.position_embeddings.weight", "transformer.block_position_embeddings.weight"]
    for i in range(num_layers):
        for module in ("input_layernorm", "attention.query_key_value", "attention.dense",
                       "post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
            keys += [f"transformer.layers.{i}.{module}.weight", f"transformer.layers.{i}.{module}.bias"]
    return keys + ["transformer.final_layernorm.weight", "transformer.final_layernorm.bias"]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_state_dict_keys_are_the_authors_keys(encoding):
    config = small_config(encoding, num_layers=3)
    state = GLMModel(config).state_dict()
    assert sorted(state) == sorted(spec_keys(3, learned=encoding == "learned_2d"))
    h, rows = config.hidden_size, config.max_sequence_length + 1
    assert state["transformer.layers.2.attention.query_key_value.weight"].shape == (3 * h, h)
    assert state["transformer.layers.0.mlp.dense_h_to_4h.weight"].shape == (4 * h, h)
    if encoding == "learned_2d":
        assert state["transformer.block_position_embeddings.weight"].shape == (rows, h)


def test_initialisation():
    config = GLMConfig(vocab_size=512, hidden_size=256, num_layers=8, num_heads=4, max_sequence_length=128)
    model = GLMModel(config)
    output_std = 0.02 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert p.abs().max() == 0, name
        elif "layernorm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            want = output_std if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")) else 0.02
            assert abs(p.std().item() - want) / want < 0.05, name
            assert abs(p.mean().item()) < want / 20, name


# ---------------------------------------------------------------------------------------------
# Logits against the independent implementation


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("attention, embedding", BACKENDS)
def test_logits_match_independent_float64_implementation(encoding, attention, embedding):
    config = small_config(encoding)
    model = random_model(config, attention=attention, embedding=embedding)
    ids, positions, sep = random_inputs(config, batch=4, seq=11)
    sep[:2] = torch.tensor([0, 11])  # plain causal and fully bidirectional rows
    expected = authors_logits(model.state_dict(), config, ids, positions, sep)
    got = model(ids, positions, sep)
    assert got.shape == (4, 11, config.vocab_size) and got.dtype == torch.float64
    assert rel_error(got, expected) < 1e-6


def test_logits_depend_on_sep_and_both_position_rows():
    # Guards the comparison above against an implementation that ignores its inputs.
    config = small_config()
    model = random_model(config)
    ids, positions, sep = random_inputs(config, batch=2, seq=9)
    sep = torch.tensor([3, 5])
    base = model(ids, positions, sep)
    assert rel_error(model(ids, positions, sep + 1), base) > 1e-3
    for row in (0, 1):
        shifted = positions.clone()
        shifted[:, row] = (shifted[:, row] + 1) % config.max_sequence_length
        assert rel_error(model(ids, shifted, sep), base) > 1e-3


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_fast_and_reference_backends_agree_in_float32(encoding, attention):
    config = small_config(encoding, max_sequence_length=64)
    model = random_model(config, dtype=torch.float32, attention=attention, scale=0.1)
    ids, positions, sep = random_inputs(config, batch=3, seq=40)
    fast = model(ids, positions, sep)
    model.attention_backend, model.embedding_backend = "reference", "reference"
    torch.testing.assert_close(fast, model(ids, positions, sep), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_bf16_autocast_within_pytorch_error(encoding, device, attention):
    # Fast backends under bf16 autocast vs the plain references in the same precision, both judged
    # against the float64 model with the same weights (conftest's tolerance rule).
    config = small_config(encoding, hidden_size=64, max_sequence_length=64)
    model = random_model(config, dtype=torch.float32, scale=0.1)
    exact_model = random_model(config, dtype=torch.float64)
    exact_model.load_state_dict(model.state_dict())
    model.to(device)
    inputs = random_inputs(config, batch=3, seq=48)
    targets = torch.randint(0, config.vocab_size, (3, 48))

    def logits_and_grads(m, backends, autocast):
        m.attention_backend, m.embedding_backend = backends
        m.zero_grad(set_to_none=True)
        on = next(m.parameters()).device
        with torch.autocast(on.type, dtype=torch.bfloat16, enabled=autocast):
            logits = m(*(t.to(on) for t in inputs))
        lm_loss(logits, targets.to(on), torch.ones(3, 48, device=on)).backward()
        watched = ("word_embeddings.weight", "transformer.layers.1.attention.query_key_value.weight")
        return logits.detach().cpu(), [m.get_parameter(name).grad.cpu() for name in watched]

    if attention == "fused" and device == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
        "glm_ext::mixed_mask_attention", "CUDA"
    ):
        pytest.skip("no CUDA kernel of mixed_mask_attention yet")
    ours, ours_grads = logits_and_grads(model, (attention, "fused"), True)
    pytorch, pytorch_grads = logits_and_grads(model, ("reference", "reference"), True)
    exact, exact_grads = logits_and_grads(exact_model, ("reference", "reference"), False)
    assert ours.dtype == torch.bfloat16
    assert_within_pytorch_error(ours, pytorch, exact)
    for o, p, e in zip(ours_grads, pytorch_grads, exact_grads):
        assert_within_pytorch_error(o, p, e, factor=3.0)


@pytest.mark.cuda
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_cuda_packed_and_cached_logits_match_cpu_float64(encoding):
    config = small_config(encoding)
    model = random_model(config)
    ids, positions, _ = random_inputs(config, batch=2, seq=10)
    sep = torch.tensor([3, 6])
    expected = model(ids, positions, sep)
    model.cuda()
    cuda_inputs = [t.cuda() for t in (ids, positions, sep)]
    torch.testing.assert_close(model(*cuda_inputs).cpu(), expected, rtol=1e-10, atol=1e-10)
    cu_seqlens = torch.tensor([0, 10, 20], dtype=torch.int32, device="cuda")
    packed = model(cuda_inputs[0].flatten(), cuda_inputs[1].transpose(0, 1).flatten(1), cuda_inputs[2],
                   cu_seqlens=cu_seqlens)
    torch.testing.assert_close(packed.cpu(), expected.flatten(0, 1), rtol=1e-10, atol=1e-10)
    cache = KVCache(10)
    with torch.no_grad():
        prefix = 6
        first = model(cuda_inputs[0][:, :prefix], cuda_inputs[1][..., :prefix], cuda_inputs[2], kv_cache=cache)
        rest = model(cuda_inputs[0][:, prefix:], cuda_inputs[1][..., prefix:], cuda_inputs[2], kv_cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1).cpu(), expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Packed rows and the key/value cache


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("attention, embedding", BACKENDS)
def test_padded_and_packed_give_the_same_logits(encoding, attention, embedding):
    config = small_config(encoding)
    model = random_model(config, attention=attention, embedding=embedding)
    lengths = [5, 9, 1, 7]
    ids, positions, _ = random_inputs(config, batch=len(lengths), seq=max(lengths))
    sep = torch.tensor([torch.randint(0, n + 1, ()).item() for n in lengths])
    padded = model(ids, positions, sep)

    real = [slice(0, n) for n in lengths]
    packed_ids = torch.cat([ids[i, r] for i, r in enumerate(real)])
    packed_positions = torch.cat([positions[i, :, r] for i, r in enumerate(real)], dim=1)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = model(packed_ids, packed_positions, sep, cu_seqlens=cu_seqlens)
    assert packed.shape == (sum(lengths), config.vocab_size)
    expected = torch.cat([padded[i, r] for i, r in enumerate(real)])
    torch.testing.assert_close(packed, expected, rtol=1e-10, atol=1e-10)


def test_logits_mask_gives_the_selected_positions_logits_and_their_gradients():
    config = small_config()
    model = random_model(config)
    ids, positions, sep = random_inputs(config, batch=3, seq=10)
    mask = torch.rand(3, 10) < 0.3
    mask[0, 0] = True
    full = model(ids, positions, sep)
    selected = model(ids, positions, sep, logits_mask=mask)
    assert selected.shape == (int(mask.sum()), config.vocab_size)
    torch.testing.assert_close(selected, full[mask], rtol=1e-12, atol=1e-12)

    # the same gradients as the loss over the full logits restricted to those positions
    targets = torch.randint(0, config.vocab_size, (3, 10))
    lm_loss(selected, targets[mask], torch.ones(int(mask.sum()), dtype=torch.float64)).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    lm_loss(model(ids, positions, sep), targets, mask.double()).backward()
    for a, b in zip(got, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    cu_seqlens = torch.tensor([0, 10], dtype=torch.int32)
    packed = model(ids[0], positions[0], sep[:1], cu_seqlens=cu_seqlens, logits_mask=mask[0])
    torch.testing.assert_close(packed, full[0][mask[0]], rtol=1e-10, atol=1e-10)
    with pytest.raises(TypeError, match="logits_mask must be a bool tensor"):
        model(ids, positions, sep, logits_mask=mask.long())
    with pytest.raises(ValueError, match=r"logits_mask must have the shape \[3, 10\]"):
        model(ids, positions, sep, logits_mask=mask[:, :5])
    with pytest.raises(ValueError, match="not both"):
        model(ids, positions, sep, logits_mask=mask, logits_index=torch.zeros(3, dtype=torch.long))


def test_padding_never_changes_real_tokens():
    config = small_config()
    model = random_model(config)
    ids, positions, sep = random_inputs(config, batch=2, seq=12)
    sep = torch.tensor([4, 7])  # real lengths 8 and 12
    base = model(ids, positions, sep)
    noisy = ids.clone()
    noisy[0, 8:] = (noisy[0, 8:] + 1) % config.vocab_size
    torch.testing.assert_close(model(noisy, positions, sep)[0, :8], base[0, :8], rtol=0, atol=0)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(
    "attention, embedding", [("sdpa", "fused"), ("fused", "fused"), ("reference", "reference"), ("auto", "fused")]
)
@pytest.mark.parametrize("chunks", [(6, 1, 1, 1, 1, 1, 1, 1, 1), (6, 2, 3, 3), (3, 3, 8)])
def test_kv_cache_matches_recomputing_everything(encoding, attention, embedding, chunks):
    config = small_config(encoding)
    model = random_model(config, attention=attention, embedding=embedding)
    total = sum(chunks)
    ids, positions, _ = random_inputs(config, batch=3, seq=total)
    sep = torch.randint(0, chunks[0] + 1, (3,))  # Part A lies within the first (prefill) chunk
    expected = model(ids, positions, sep)
    cache = KVCache(max_length=total + 2)
    start, pieces = 0, []
    with torch.no_grad():
        for n in chunks:
            pieces.append(model(ids[:, start : start + n], positions[:, :, start : start + n], sep, kv_cache=cache))
            start += n
    assert cache.length == total
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=1e-10, atol=1e-10)


def test_auto_decodes_with_sdpa_on_cpu(monkeypatch):
    model = random_model(small_config(), attention="auto")
    ids, positions, sep = random_inputs(model.config, batch=2, seq=6)
    kernel, kernel_queries = model_module.ops.mixed_mask_attention, []

    def spy(q, *args, **kwargs):
        kernel_queries.append(q.shape[1])
        return kernel(q, *args, **kwargs)

    monkeypatch.setattr(model_module.ops, "mixed_mask_attention", spy)
    cache = KVCache(16)
    with torch.no_grad():
        model(ids[:, :5], positions[:, :, :5], sep, kv_cache=cache)  # prefill: the fused kernel
        model(ids[:, 5:], positions[:, :, 5:], sep, kv_cache=cache)  # one token per row: SDPA
    assert kernel_queries == [5] * model.config.num_layers
    assert model.backends("cpu", decoding=True).attention == "sdpa"


def test_kv_cache_follows_autocast_dtype():
    config = small_config()
    model = random_model(config, dtype=torch.float32)
    ids, positions, sep = random_inputs(config, batch=2, seq=6)
    cache = KVCache(16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, positions, sep, kv_cache=cache)
        out = model(ids[:, :1], positions[:, :, :1], sep, kv_cache=cache)
    assert out.dtype == torch.bfloat16 and cache.length == 7


# ---------------------------------------------------------------------------------------------
# Loss


def test_lm_loss_matches_masked_mean_of_log_softmax():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0]])
    picked = [(b, t) for b in range(2) for t in range(5) if mask[b, t]]
    manual = sum(torch.logsumexp(logits[b, t], 0) - logits[b, t, targets[b, t]] for b, t in picked) / len(picked)
    loss = lm_loss(logits, targets, mask)
    assert loss.dtype == torch.float64  # float64 logits keep their precision
    torch.testing.assert_close(loss, manual, rtol=1e-12, atol=1e-12)
    assert lm_loss(logits.float(), targets, mask).dtype == torch.float32


def test_lm_loss_weights_and_ignores_masked_targets():
    logits = torch.randn(4, 9)
    targets = torch.tensor([1, 2, -100, 50])  # out-of-range targets sit under a zero mask
    weights = torch.tensor([2.0, 1.0, 0.0, 0.0])
    per_token = torch.nn.functional.cross_entropy(logits[:2], targets[:2], reduction="none")
    torch.testing.assert_close(lm_loss(logits, targets, weights), (2 * per_token[0] + per_token[1]) / 3)


def test_lm_loss_of_bf16_logits_is_computed_in_float32():
    logits = (torch.randn(3, 6, 50) * 4).to(torch.bfloat16)
    targets = torch.randint(0, 50, (3, 6))
    mask = torch.ones(3, 6)
    loss = lm_loss(logits, targets, mask)
    torch.testing.assert_close(loss, lm_loss(logits.float(), targets, mask), rtol=0, atol=0)


def test_lm_loss_of_an_empty_mask_is_zero_without_nan():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = lm_loss(logits, torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_lm_loss_shape_mismatch():
    with pytest.raises(ValueError, match="targets and loss_mask must have the shape"):
        lm_loss(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.int64), torch.ones(2, 4))


# ---------------------------------------------------------------------------------------------
# Training features


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_activation_checkpointing_gives_the_same_gradients(encoding):
    config = small_config(encoding)
    ids, positions, sep = random_inputs(config, batch=2, seq=10)
    targets = torch.randint(0, config.vocab_size, (2, 10))
    grads = []
    for flag in (False, True):
        torch.manual_seed(1)
        model = random_model(config)
        model.activation_checkpointing = flag
        lm_loss(model(ids, positions, sep), targets, torch.ones(2, 10)).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_torch_compile_fullgraph_forward_and_backward(encoding, attention):
    config = small_config(encoding)
    model = random_model(config, dtype=torch.float32, attention=attention, scale=0.1)
    ids, positions, sep = random_inputs(config, batch=2, seq=9)
    targets = torch.randint(0, config.vocab_size, (2, 9))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for m in (model, compiled):
        model.zero_grad(set_to_none=True)
        logits = m(ids, positions, sep)
        lm_loss(logits, targets, torch.ones(2, 9)).backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor_forward():
    config = small_config(num_layers=1)
    model = random_model(config, dtype=torch.float32, scale=0.1)
    ids, positions, sep = random_inputs(config, batch=2, seq=8)
    torch._dynamo.reset()
    start = time.perf_counter()
    with torch.no_grad():
        got = torch.compile(model, fullgraph=True)(ids, positions, sep)
    assert time.perf_counter() - start < 120
    torch.testing.assert_close(got, model(ids, positions, sep), rtol=1e-5, atol=1e-5)


def test_tiny_preset_learns_a_batch_on_the_cpu():
    config = GLMConfig.preset("tiny")
    model = GLMModel(config)
    ids, positions, _ = random_inputs(config, batch=4, seq=32)
    sep = torch.full((4,), 16)
    targets = torch.roll(ids, -1, dims=1)
    mask = (torch.arange(32) >= 16).expand(4, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = lm_loss(model(ids, positions, sep), targets, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(config.vocab_size), rel=0.05)
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------------------------------
# Bad input


def bad_cases():
    gen = torch.Generator().manual_seed(0)  # collected before the seeding fixture runs
    ids = torch.randint(0, 61, (2, 6), generator=gen)
    pos = torch.randint(0, 21, (2, 2, 6), generator=gen)
    pos[0, 0, 0] = 0  # so that pos - 1 goes negative
    sep = torch.tensor([2, 6])
    p = lambda **kw: {**dict(input_ids=ids, position_ids=pos, sep=sep), **kw}  # noqa: E731
    too_far = pos.clone()
    too_far[1, 0, 3] = 21
    block_too_far = pos.clone()
    block_too_far[0, 1, 5] = 99
    return [
        (p(position_ids=too_far), ValueError, r"position_ids must lie in \[0, max_sequence_length=20\].*21"),
        (p(position_ids=block_too_far), ValueError, "position_ids must lie in"),
        (p(position_ids=pos - 1), ValueError, "position_ids must lie in"),
        (p(sep=torch.tensor([2, 7])), ValueError, r"sep must lie in \[0, L\]"),
        (p(sep=torch.tensor([-1, 3])), ValueError, r"sep must lie in \[0, L\]"),
        (p(position_ids=pos[:, 0]), ValueError, r"position_ids must have the shape \[2, 2, 6\]"),
        (p(position_ids=pos[:, :, :5]), ValueError, r"position_ids must have the shape \[2, 2, 6\]"),
        (p(sep=sep[:, None]), ValueError, r"sep must have the shape \[2\]"),
        (p(sep=torch.tensor([2.0, 6.0])), TypeError, "sep must be int32 or int64"),
        (p(sep=3), TypeError, "sep must be a tensor"),
        (p(input_ids=ids.float()), TypeError, "input_ids must be an int32 or int64 tensor"),
        (p(input_ids=ids[None]), ValueError, r"input_ids must have the shape \[B, L\]"),
        (p(input_ids=ids[:, :0], position_ids=pos[:, :, :0]), ValueError, "at least one token"),
        (p(position_ids=pos.float()), TypeError, "position_ids must be int32 or int64"),
    ]


@pytest.mark.parametrize("kwargs, error, match", bad_cases())
def test_bad_input_gets_clear_error(kwargs, error, match):
    model = random_model(small_config(), dtype=torch.float32)
    with pytest.raises(error, match=match):
        model(kwargs.pop("input_ids"), kwargs.pop("position_ids"), kwargs.pop("sep"))


def test_out_of_vocabulary_ids_raise_index_error():
    model = random_model(small_config(), dtype=torch.float32)
    with pytest.raises(IndexError, match="input_ids"):
        model(torch.tensor([[3, 61]]), torch.zeros(1, 2, 2, dtype=torch.int64), torch.tensor([1]))


@pytest.mark.parametrize(
    "cu_seqlens, sep, error, match",
    [
        ([0, 3, 7], [1, 2], ValueError, r"cu_seqlens must start at 0.*end at the number of tokens \(6\)"),
        ([1, 3, 6], [1, 2], ValueError, "cu_seqlens must start at 0"),
        ([0, 4, 3, 6], [1, 0, 2], ValueError, "never decrease"),
        ([0, 3, 6], [1, 4], ValueError, r"sep must lie in \[0, L\] with L the length of its sample"),
        ([0, 3, 6], [1, 2, 0], ValueError, r"sep must have the shape \[2\]"),
        ([[0, 3, 6]], [1, 2], ValueError, r"cu_seqlens must have the shape \[n \+ 1\]"),
    ],
)
def test_bad_packed_input(cu_seqlens, sep, error, match):
    model = random_model(small_config(), dtype=torch.float32)
    ids, pos = torch.randint(0, 61, (6,)), torch.randint(0, 21, (2, 6))
    cu = torch.tensor(cu_seqlens, dtype=torch.int32)
    with pytest.raises(error, match=match):
        model(ids, pos, torch.tensor(sep), cu_seqlens=cu)


def test_bad_packed_layout_and_dtypes():
    model = random_model(small_config(), dtype=torch.float32)
    ids, pos, sep = torch.randint(0, 61, (6,)), torch.randint(0, 21, (2, 6)), torch.tensor([1, 2])
    with pytest.raises(TypeError, match="cu_seqlens must be an int32 tensor"):
        model(ids, pos, sep, cu_seqlens=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match=r"input_ids must have the shape \[T\] with cu_seqlens"):
        model(ids[None], pos, sep, cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"position_ids must have the shape \[2, 6\]"):
        model(ids, pos[None], sep, cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="kv_cache does not support packed rows"):
        model(ids, pos, sep, cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32), kv_cache=KVCache(8))


def test_kv_cache_errors():
    model = random_model(small_config(), dtype=torch.float32)
    ids, pos, sep = random_inputs(model.config, batch=2, seq=5)
    cache = KVCache(6)
    with torch.no_grad():
        model(ids, pos, sep, kv_cache=cache)
        with pytest.raises(ValueError, match=r"kv_cache is full: 5 cached \+ 2 new tokens > max_length 6"):
            model(ids[:, :2], pos[:, :, :2], sep, kv_cache=cache)
        with pytest.raises(ValueError, match="kv_cache holds 2 rows, input_ids has 1"):
            model(ids[:1, :1], pos[:1, :, :1], sep[:1], kv_cache=cache)
    with pytest.raises(ValueError, match="max_length must be positive"):
        KVCache(0)


def test_unknown_backends():
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        GLMModel(small_config(), attention_backend="flash")
    model = GLMModel(small_config())
    with pytest.raises(ValueError, match="embedding_backend must be one of"):
        model.embedding_backend = "triton"


# ---------------------------------------------------------------------------------------------
# Attention backend choice ("auto") and the dense mask


def choose(requested="auto", device_type="cpu", dtype=torch.float32, head_dim=64, attention_dropout=0.0,
           decoding=False):
    return model_module.choose_attention_backend(
        requested, device_type=device_type, dtype=dtype, head_dim=head_dim, attention_dropout=attention_dropout,
        decoding=decoding,
    ).backend


def test_auto_attention_backend_decisions(monkeypatch):
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        assert choose(dtype=dtype, head_dim=8) == choose(dtype=dtype, head_dim=256) == "fused"
    assert choose(head_dim=512) == "sdpa"
    assert choose(attention_dropout=0.1) == "sdpa"  # the kernel has no dropout
    assert choose(device_type="mps") == "sdpa"
    assert choose(decoding=True) == "sdpa"  # the CPU kernel has no few-query path
    assert choose("fused", decoding=True) == "fused"
    # CUDA: SDPA until the kernel has passed its tests on a GPU, then fused where it applies.
    monkeypatch.setattr(model_module, "FUSED_ATTENTION_CUDA_VERIFIED", False)
    choice = model_module.choose_attention_backend(
        "auto", device_type="cuda", dtype=torch.bfloat16, head_dim=64, attention_dropout=0.0
    )
    assert choice == model_module.AttentionChoice("sdpa", model_module.FUSED_ATTENTION_CUDA_PENDING)
    monkeypatch.setattr(model_module, "FUSED_ATTENTION_CUDA_VERIFIED", True)
    monkeypatch.setattr(model_module, "EXTENSION_HAS_CUDA_KERNELS", False)
    assert choose(device_type="cuda", dtype=torch.bfloat16, head_dim=64) == "sdpa"
    monkeypatch.setattr(model_module, "EXTENSION_HAS_CUDA_KERNELS", True)
    for dtype in (torch.bfloat16, torch.float16):
        for head_dim in (64, 128):
            assert choose(device_type="cuda", dtype=dtype, head_dim=head_dim) == "fused"
        assert choose(device_type="cuda", dtype=dtype, head_dim=96) == "sdpa"
    assert choose(device_type="cuda", dtype=torch.float32, head_dim=64) == "sdpa"
    assert choose(device_type="cuda", dtype=torch.bfloat16, head_dim=64, attention_dropout=0.1) == "sdpa"
    # Explicit backends are kept, but never silently without the dropout the model trains with.
    assert choose("reference") == "reference" and choose("sdpa", attention_dropout=0.1) == "sdpa"
    with pytest.raises(ValueError, match="attention_backend='fused' has no attention dropout"):
        choose("fused", attention_dropout=0.1)


def test_model_resolves_auto_per_mode_and_autocast():
    model = GLMModel(small_config(attention_dropout=0.1))
    assert model.attention_backend == "auto" and model.backends("cpu").attention == "sdpa"  # training
    model.eval()
    assert model.backends("cpu").attention == "fused"
    assert model.backends("cuda").attention == "sdpa"  # see FUSED_ATTENTION_CUDA_VERIFIED
    assert model.backends("cpu", torch.bfloat16).attention_kernel is not None
    model.attention_backend = "reference"
    assert model.backends("cpu").reason == "set explicitly"


@pytest.mark.parametrize("seq_q, seq_k", [(7, 7), (3, 7)])
def test_dense_mask_is_the_mixed_mask(seq_q, seq_k):
    sep = torch.tensor([0, 2, 7])
    expected = reference.mixed_mask(sep, seq_q, seq_k)[:, None]
    assert torch.equal(model_module.dense_mixed_mask(sep, None, seq_q, seq_k), expected)
    cu_seqlens = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    packed = model_module.dense_mixed_mask(torch.tensor([1, 0, 5]), cu_seqlens, 8, 8)[0, 0]
    blocks = torch.block_diag(reference.mixed_mask(torch.tensor([1]), 3, 3)[0],
                              reference.mixed_mask(torch.tensor([5]), 5, 5)[0])
    assert torch.equal(packed, blocks)


# ---------------------------------------------------------------------------------------------
# Dropout


DROPOUTS = ("embedding_dropout", "attention_dropout", "output_dropout")


def test_configs_without_dropout_fields_load_with_no_dropout():
    saved = {k: v for k, v in small_config().to_dict().items() if k not in DROPOUTS}  # an older config.json
    config = GLMConfig.from_dict(saved)
    assert all(getattr(config, name) == 0.0 for name in DROPOUTS)
    with pytest.raises(ValueError, match=r"GLMConfig.output_dropout must be a probability in \[0, 1\), got 1.0"):
        small_config(output_dropout=1.0)


@pytest.mark.parametrize("attention", ["auto", "sdpa", "fused"])
def test_no_dropout_trains_exactly_like_eval(attention):
    # Dropout 0 (the default) leaves training exactly as before dropout existed: train() and eval()
    # agree bit for bit, and test_logits_match_independent_float64_implementation pins eval().
    model = random_model(small_config(), attention=attention)
    ids, positions, sep = random_inputs(model.config, batch=3, seq=10)
    train_logits = model(ids, positions, sep)
    model.eval()
    assert torch.equal(train_logits, model(ids, positions, sep))


@pytest.mark.parametrize("name", DROPOUTS)
def test_dropout_acts_in_training_only(name):
    config = small_config(hidden_size=64, max_sequence_length=32)
    plain = random_model(config, attention="auto", scale=0.1)
    dropped = GLMModel(dataclasses.replace(config, **{name: 0.3})).double()
    dropped.load_state_dict(plain.state_dict())
    ids, positions, sep = random_inputs(config, batch=2, seq=24)
    plain.eval()
    expected = plain(ids, positions, sep)
    first, second = dropped(ids, positions, sep), dropped(ids, positions, sep)
    assert rel_error(first, expected) > 1e-3 and rel_error(second, first) > 1e-3
    dropped.eval()
    assert torch.equal(dropped(ids, positions, sep), expected)


def test_dropout_with_activation_checkpointing_recomputes_the_same_masks():
    config = small_config(embedding_dropout=0.2, attention_dropout=0.2, output_dropout=0.2)
    weights = random_model(config).state_dict()
    ids, positions, sep = random_inputs(config, batch=2, seq=10)
    targets = torch.randint(0, config.vocab_size, (2, 10))
    grads = []
    for flag in (False, True):
        model = GLMModel(config, activation_checkpointing=flag).double()
        model.load_state_dict(weights)
        torch.manual_seed(7)
        lm_loss(model(ids, positions, sep), targets, torch.ones(2, 10)).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
