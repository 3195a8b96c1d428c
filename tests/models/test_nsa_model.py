"""The NSA causal LM on transformers: forward, loss, backward, generate, round trip, Auto classes, presets."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import nsa  # noqa: E402
from nsa import NSACache, NSAConfig, NSAForCausalLM, NSAModel  # noqa: E402

SMALL = nsa.SparsityConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, num_init=1, num_local=2, window=32)


def tiny(**kwargs):
    base = dict(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, head_dim=8, v_head_dim=12, sparsity=SMALL, pad_token_id=0, eos_token_id=None)
    return NSAConfig(**{**base, **kwargs})


def model(**kwargs):
    return NSAForCausalLM(tiny(**kwargs)).eval()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rms_norm_scales_each_vector_to_unit_rms_times_the_weight(dtype, tol):
    from nsa.models.modeling_nsa import NSARMSNorm

    torch.manual_seed(0)
    norm = NSARMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    norm = norm.to(dtype)
    x = (torch.randn(3, 5, 64) * torch.rand(3, 5, 1) * 10).to(dtype)
    xd = x.double()
    want = xd / (xd.square().mean(-1, keepdim=True) + 1e-5).sqrt() * norm.weight.double()
    got = norm(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("attn_impl", ["nsa", "dense"])
def test_loss_is_shifted_cross_entropy_and_every_parameter_learns(attn_impl):
    m = model(attn_impl=attn_impl).train()
    ids = torch.randint(1, 101, (2, 50))
    labels = ids.clone()
    labels[0, :7] = -100
    out = m(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # At initialisation the model predicts close to uniformly: the output scale of every block is sane.
    assert abs(out.loss.item() - math.log(101)) < 0.5
    out.loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_gradient_checkpointing_gives_the_same_gradients():
    m = model().train()
    ids = torch.randint(1, 101, (2, 40))
    m(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()  # newer name first
    out = m(ids, labels=ids)
    assert out.loss.requires_grad
    out.loss.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)


def greedy_by_recomputing(m, ids, steps):
    for _ in range(steps):
        logits = m(ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("attn_impl,share_win_kv", [("nsa", False), ("nsa", True), ("dense", False)])
def test_greedy_generate_equals_argmax_of_full_forwards(attn_impl, share_win_kv):
    m = model(attn_impl=attn_impl, share_win_kv=share_win_kv).double()
    prompt = torch.randint(1, 101, (2, 21))
    lengths = []
    hook = m.model.register_forward_pre_hook(lambda mod, args, kw: lengths.append(kw["input_ids"].shape[1]),
                                             with_kwargs=True)
    out = m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False)
    hook.remove()
    # The cache is used: after the prompt, one token per step (the sequence grows past the window and blocks).
    assert lengths == [21] + [1] * 29
    assert torch.equal(out, greedy_by_recomputing(m, prompt, 30))


def test_forward_returns_an_nsa_cache_that_continues_the_sequence():
    m = model().double()
    ids = torch.randint(1, 101, (1, 45))
    full = m(ids, use_cache=False).logits
    first = m(ids[:, :30], use_cache=True)
    cache = first.cache if hasattr(first, "cache") and first.cache is not None else first.past_key_values
    assert isinstance(cache, NSACache) and cache.get_seq_length() == 30
    rest = m(ids[:, 30:], past_key_values=cache).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], dim=1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attn_impl", ["nsa", "dense"])
def test_packed_sequences_run_as_if_alone(attn_impl):
    m = model(attn_impl=attn_impl).double()
    a, b = torch.randint(1, 101, (1, 19)), torch.randint(1, 101, (1, 40))
    cu = torch.tensor([0, 19, 59], dtype=torch.int32)
    packed = m(torch.cat([a, b], dim=1), cu_seqlens=cu).logits
    torch.testing.assert_close(packed, torch.cat([m(a).logits, m(b).logits], dim=1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_round_trip_bit_exactly(tmp_path, tie):
    m = model(tie_word_embeddings=tie)
    m.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is NSAForCausalLM and loaded.config.sparsity == SMALL
    before, after = m.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    ids = torch.randint(1, 101, (2, 37))
    assert torch.equal(m(ids).logits, loaded(ids).logits)


def test_auto_classes_know_the_model():
    config = tiny()
    assert type(transformers.AutoConfig.for_model("nsa")) is NSAConfig
    assert type(transformers.AutoModel.from_config(config)) is NSAModel
    assert type(transformers.AutoModelForCausalLM.from_config(config)) is NSAForCausalLM


def test_config_round_trips_and_validates(tmp_path):
    config = tiny(attn_impl="dense", share_win_kv=True)
    config.save_pretrained(tmp_path)
    loaded = NSAConfig.from_pretrained(tmp_path)
    assert loaded.sparsity == SMALL and loaded.attn_impl == "dense" and loaded.share_win_kv and loaded.v_head_dim == 12
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        tiny(attn_impl="flash")
    with pytest.raises(ValueError, match="must divide cmp_block"):
        tiny(sparsity=None, cmp_block=12, cmp_stride=8)
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        tiny(num_key_value_heads=4)
    with pytest.raises(TypeError, match="sparsity must be a SparsityConfig"):
        tiny(sparsity={"window": 8})


def test_padding_and_foreign_caches_are_refused():
    m = model()
    ids = torch.randint(1, 101, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="attention_mask must be all ones"):
        m(ids, attention_mask=mask)
    with pytest.raises(TypeError, match="cache must be an NSACache"):
        m(ids, past_key_values=transformers.DynamicCache())


@pytest.mark.parametrize("preset,low,high", [("nsa_100m", 90e6, 130e6), ("nsa_1b", 0.9e9, 1.3e9)])
def test_presets_have_their_size(preset, low, high):
    from nsa.models.modeling_nsa import NSADecoderLayer

    config = getattr(NSAConfig, preset)()
    # One layer stands for all of them: building the whole 1B model on the CPU would take most of a CI minute.
    layer = sum(p.numel() for p in NSADecoderLayer(config, 0).parameters())
    embeddings = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    count = config.num_hidden_layers * layer + embeddings + config.hidden_size
    assert low < count < high, count


def test_beam_search_with_the_cache_equals_beam_search_without():
    m = model().double()
    prompt = torch.randint(1, 101, (2, 19))
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=16, num_beams=3, do_sample=False)
    assert torch.equal(m.generate(prompt, **kwargs), m.generate(prompt, use_cache=False, **kwargs))


def cache_kwarg(cache) -> dict:
    """generate()'s keyword for a cache of the caller's, under this transformers version's name."""
    from nsa.models.modeling_nsa import CACHE_FIELD

    return {CACHE_FIELD: cache}


@pytest.mark.parametrize("attn_impl", ["nsa", "dense"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_on_a_cache_for_cuda_graphs_equals_generate(attn_impl, num_beams):
    # On the CPU nothing is captured, but the steps run at the fixed shapes a captured step has (a dense layer reads
    # every slot of the cache, masked by the device lengths) and beams are reordered in place.
    m = model(attn_impl=attn_impl).double()
    prompt = torch.randint(1, 101, (2, 19))
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=25, do_sample=False, num_beams=num_beams)
    cache = NSACache(capacity=19 + 25, cuda_graph=True)
    assert torch.equal(m.generate(prompt, **kwargs, **cache_kwarg(cache)), m.generate(prompt, **kwargs))
    assert cache.get_seq_length() == 19 + 24 and not cache.graphs


@pytest.mark.parametrize("attn_impl", ["nsa", "dense"])
def test_decode_steps_on_a_cache_for_cuda_graphs_give_the_same_logits(attn_impl):
    m = model(attn_impl=attn_impl).double()
    ids = torch.randint(1, 101, (2, 30))
    logits = []
    for cache in (NSACache(capacity=30, cuda_graph=True), NSACache()):
        steps = [m(ids[:, :20], cache=cache).logits] + [m(ids[:, t:t + 1], cache=cache).logits for t in range(20, 30)]
        logits.append(torch.cat(steps, dim=1))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-12, atol=1e-12)


def test_cache_for_cuda_graphs_needs_a_fixed_capacity():
    with pytest.raises(ValueError, match="cuda_graph needs a capacity"):
        NSACache(cuda_graph=True)
    m = model().double()
    cache = NSACache(capacity=24, cuda_graph=True)
    m(torch.randint(1, 101, (1, 20)), cache=cache)
    with pytest.raises(ValueError, match="holds 24 tokens per sequence; 25 needed"):
        m(torch.randint(1, 101, (1, 5)), cache=cache)


def test_each_kind_of_captured_step_runs_phi_as_its_steps_do(monkeypatch):
    """A capture runs the step's Python once, and its branches are what the graph replays: the capture of a step
    that completes a block must run phi and the other's must not, although each kind is captured after an eager
    step of its kind has moved the host lengths on. A stand-in for CUDA graphs (none on the CPU) counts the layers
    that run phi while a step is captured."""
    phi, captures = [], []

    class Graph:
        def replay(self):
            pass

    @contextlib.contextmanager
    def capture(graph):
        before = len(phi)
        yield
        captures.append(len(phi) - before)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    m = model().double()
    for layer in m.model.layers:
        compress = layer.self_attn.compress
        layer.self_attn.compress = lambda *args, compress=compress, **kwargs: phi.append(1) or compress(*args, **kwargs)
    cache = NSACache(capacity=40, cuda_graph=True)
    ids = torch.randint(1, 101, (2, 20))
    with torch.no_grad():
        m(ids, cache=cache)
        # SMALL's blocks end at tokens 7, 11, ..., 23, 27: steps 23 and 27 run phi. Step 20 captures the kind
        # without phi, step 23 the kind with it; the others replay.
        for t in range(20, 28):
            m.model._graph_step(ids[:, :1], torch.full((2, 1), t), cache)
    assert captures == [0, 2] and sorted(phi for _, phi in cache.graphs) == [False, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("attn_impl", ["nsa", "dense"])
def test_captured_decode_steps_equal_eager_ones_on_the_gpu(attn_impl):
    m = model(attn_impl=attn_impl, sparsity=nsa.SparsityConfig(), head_dim=32, v_head_dim=32).cuda().requires_grad_(False)
    ids = torch.randint(1, 101, (2, 340), device="cuda")
    logits = []
    # Without grad mode the steps after the first replay a captured one; with it they all run eagerly.
    for grad in (False, True):
        cache = NSACache(capacity=340, cuda_graph=True)
        with torch.set_grad_enabled(grad):
            steps = [m(ids[:, :300], cache=cache).logits]
            steps += [m(ids[:, t:t + 1], cache=cache).logits for t in range(300, 340)]
        # Steps 303, 319 and 335 complete a block of phi (l = 32, d = 16): NSA captures a step with phi and one
        # without, and replays both.
        assert len(cache.graphs) == (0 if grad else 2 if attn_impl == "nsa" else 1)
        assert cache.get_seq_length() == 340
        logits.append(torch.cat(steps, dim=1))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-6)
    # generate() on such a cache replays its steps too.
    prompt = ids[:, :300]
    cache = NSACache(capacity=330, cuda_graph=True)
    out = m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                     **cache_kwarg(cache))
    assert out.shape == (2, 330) and cache.graphs and cache.get_seq_length() == 329
