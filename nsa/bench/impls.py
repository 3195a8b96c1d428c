"""What is timed: NSA and the dense baselines, each built as a function of its inputs at one shape.

Each builder returns a Built whose fn(*inputs) returns one output tensor; the suite times fn for the
forward, autograd.grad of its output for the backward. Builders raise Skip when a side cannot run a
shape at all (a reason, not a failure).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import nsa

from .configs import BenchConfig, dense_flops, nsa_flops
from .measure import L2_BYTES


class Skip(Exception):
    """A side that does not take this shape or device; the message says why."""


@dataclass
class Built:
    """fn(*inputs[i]) for each rotated copy i of the inputs; flops (forward, backward) of one call, or None;
    bytes_fwd: the forward's traffic where the tensor sizes overstate it (decode), else None; params: the
    parameters whose gradients a backward computes besides the inputs' (a layer's weights); timer: a side that
    times itself (generate) returns its row's figures from timer() instead of being timed call by call; layers:
    the steps one call runs (decode steps as the layers of one CUDA graph), over which a row divides its time."""

    fn: Callable[..., torch.Tensor]
    inputs: list[tuple]
    flops: tuple[int, int] | None
    note: str = ""
    bytes_fwd: int | None = None
    params: list = field(default_factory=list)
    timer: Callable[[], dict] | None = None
    layers: int = 1


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def rotated(make: Callable[[], tuple]) -> list[tuple]:
    """Copies of the inputs make() draws, enough that cycling through them defeats a GPU's L2 (one copy
    when a single set is already larger than a few L2s, as at every GPU length of this suite, or on a CPU)."""
    first = make()
    size = tensor_bytes(first)
    on_gpu = any(isinstance(x, torch.Tensor) and x.is_cuda for x in first)
    copies = 1 if size >= 3 * L2_BYTES or not on_gpu else min(4, math.ceil(3 * L2_BYTES / max(size, 1)))
    return [first] + [make() for _ in range(copies - 1)]


def layered(make: Callable[[], tuple], layers: int, device) -> tuple[Callable[[], tuple], int, int]:
    """(make_layers, n, width) for n = `layers` decode steps per call, as a model's layers run in one step:
    make_layers() draws n sets of make()'s `width` inputs (one per layer, so that no step finds another's cache in
    L2) as one flat tuple, which each_layer(fn, width) steps through. On a GPU n is cut to what half the free memory
    holds (at least 1)."""
    first = make()
    n = layers
    if layers > 1 and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        n = max(1, min(layers, free // 2 // max(tensor_bytes(first), 1)))
    pending = [first]

    def make_layers():
        sets = [pending.pop() if pending else make() for _ in range(n)]
        return tuple(x for one in sets for x in one)

    return make_layers, n, len(first)


def each_layer(fn: Callable, width: int) -> Callable:
    """fn on each layer's `width` inputs of a flat tuple in turn; returns the last output."""
    def steps(*flat):
        for i in range(0, len(flat), width):
            out = fn(*flat[i:i + width])
        return out

    return steps


def _leaf(shape, device, dtype, grad=True, fill=torch.randn):
    return fill(*shape, device=device, dtype=dtype).requires_grad_(grad)


def nsa_gates(cfg: BenchConfig, batch: int, seqlen: int, device, dtype, grad=True) -> torch.Tensor:
    gates = torch.rand(batch, seqlen, cfg.hq, 3, device=device, dtype=dtype)
    if not cfg.window_gate:
        gates[..., 2] = 0
    return gates.requires_grad_(grad)


def nsa_inputs(cfg: BenchConfig, batch: int, seqlen: int, device, dtype, grad=True) -> tuple:
    """(q, k, v, gates), with k_cmp, v_cmp before gates unless cfg.pooled (then fn pools k and v)."""
    q = _leaf((batch, seqlen, cfg.hq, cfg.dk), device, dtype, grad)
    k = _leaf((batch, seqlen, cfg.hkv, cfg.dk), device, dtype, grad)
    v = _leaf((batch, seqlen, cfg.hkv, cfg.dv), device, dtype, grad)
    gates = nsa_gates(cfg, batch, seqlen, device, dtype, grad)
    if cfg.pooled:
        return q, k, v, gates
    tc = cfg.sparsity.num_cmp(seqlen)
    k_cmp = _leaf((batch, tc, cfg.hkv, cfg.dk), device, dtype, grad)
    v_cmp = _leaf((batch, tc, cfg.hkv, cfg.dv), device, dtype, grad)
    return q, k, v, k_cmp, v_cmp, gates


def mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, T, H, D] -> [B, T // block, H, D]: the mean of each complete block (float32 sum, x's dtype out)."""
    B, T, H, D = x.shape
    n = T // block
    return x[:, : n * block].unflatten(1, (n, block)).float().mean(2).to(x.dtype)


def nsa_call(cfg: BenchConfig, backend: str, return_indices: bool = False) -> Callable:
    """fn(*nsa_inputs(...)) -> nsa_attention's output, pooling k_cmp/v_cmp first where cfg.pooled."""

    def fn(*inputs):
        if cfg.pooled:
            q, k, v, gates = inputs
            k_cmp, v_cmp = mean_pool(k, cfg.sparsity.cmp_block), mean_pool(v, cfg.sparsity.cmp_block)
        else:
            q, k, v, k_cmp, v_cmp, gates = inputs
        return nsa.nsa_attention(q, k, v, k_cmp, v_cmp, gates, config=cfg.sparsity, backend=backend,
                                 return_indices=return_indices)

    return fn


def build_nsa(cfg: BenchConfig, batch: int, seqlen: int, device, dtype, backend: str) -> Built:
    return Built(nsa_call(cfg, backend), rotated(lambda: nsa_inputs(cfg, batch, seqlen, device, dtype)),
                 nsa_flops(cfg, batch, seqlen), note=f"backend={backend}")


def _dense_inputs(cfg: BenchConfig, batch: int, seqlen: int, device, dtype) -> tuple:
    # [B, H, T, D]: the layout SDPA and FlexAttention read without a copy.
    return (_leaf((batch, cfg.hq, seqlen, cfg.dk), device, dtype), _leaf((batch, cfg.hkv, seqlen, cfg.dk), device, dtype),
            _leaf((batch, cfg.hkv, seqlen, cfg.dv), device, dtype))


def _sdpa(backends, causal: bool, gqa: bool) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(backends):
            if gqa:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            group = q.shape[1] // k.shape[1]
            return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                  is_causal=causal)

    return fn


def sdpa_fn(backends, probe: tuple, causal: bool = True) -> tuple[Callable, str]:
    """SDPA restricted to `backends`, with enable_gqa where the backend takes it, else K/V heads repeated
    inside the timed call. Raises Skip when the backends take neither form of the probe inputs."""
    errors = []
    for gqa in (True, False):
        fn = _sdpa(backends, causal, gqa)
        try:
            with torch.no_grad():
                fn(*probe)
        except RuntimeError as error:
            errors.append(str(error).splitlines()[0][:160])
            continue
        return fn, "" if gqa else "K/V heads repeated inside the timed call (enable_gqa refused)"
    raise Skip("; ".join(errors))


def _probe(inputs: tuple, length: int = 256) -> tuple:
    return tuple(x[:, :, :length].detach().contiguous() for x in inputs)


def build_sdpa(cfg: BenchConfig, batch: int, seqlen: int, device, dtype, backend: str) -> Built:
    from torch.nn.attention import SDPBackend

    if backend == "flash" and cfg.dk != cfg.dv:
        raise Skip("FA2 in SDPA refuses DK != DV")
    if backend in ("cudnn", "flash") and device.type != "cuda":
        raise Skip("needs CUDA")
    chosen = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
    inputs = rotated(lambda: _dense_inputs(cfg, batch, seqlen, device, dtype))
    fn, note = sdpa_fn([chosen[backend]], _probe(inputs[0]))
    return Built(fn, inputs, dense_flops(cfg, batch, seqlen), note)


_compiled_flex = None


def build_flex(cfg: BenchConfig, batch: int, seqlen: int, device, dtype) -> Built:
    if device.type != "cuda":
        raise Skip("needs CUDA")
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _compiled_flex is None:
        # Every shape, and the switch between grad and no-grad calls, is a recompilation of one function: past
        # dynamo's default limit (8) it would fall back to the unfused path, which materializes the T x T scores.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, seqlen, seqlen, device=device)

    def fn(q, k, v):
        return _compiled_flex(q, k, v, block_mask=mask, enable_gqa=True)

    return Built(fn, rotated(lambda: _dense_inputs(cfg, batch, seqlen, device, dtype)),
                 dense_flops(cfg, batch, seqlen), "torch.compile(flex_attention), causal block mask")


def import_fla():
    """fla's parallel_nsa, or Skip saying why not. fla warns at import that flash_attn is missing: it only
    serves fla's window branch, which this suite does not use."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fla.ops.nsa import parallel_nsa
    except Exception as error:  # an unimportable optional baseline is a note in its rows, not a failure
        raise Skip(f"fla not importable: {type(error).__name__}: {str(error)[:160]}") from None
    return parallel_nsa


def fla_call(cfg: BenchConfig) -> Callable:
    parallel_nsa = import_fla()
    s = cfg.sparsity

    def fn(q, k, v, g_cmp, g_slc):
        return parallel_nsa(q, k, v, g_cmp=g_cmp, g_slc=g_slc, block_counts=s.num_selected, block_size=s.slc_block,
                            window_size=0)

    return fn


def fla_inputs(cfg: BenchConfig, batch: int, seqlen: int, device, dtype, grad=True) -> tuple:
    q = _leaf((batch, seqlen, cfg.hq, cfg.dk), device, dtype, grad)
    k = _leaf((batch, seqlen, cfg.hkv, cfg.dk), device, dtype, grad)
    v = _leaf((batch, seqlen, cfg.hkv, cfg.dv), device, dtype, grad)
    g_cmp = _leaf((batch, seqlen, cfg.hq), device, dtype, grad, torch.rand)
    g_slc = _leaf((batch, seqlen, cfg.hq), device, dtype, grad, torch.rand)
    return q, k, v, g_cmp, g_slc


def build_fla(cfg: BenchConfig, batch: int, seqlen: int, device, dtype) -> Built:
    if device.type != "cuda":
        raise Skip("needs CUDA")
    return Built(fla_call(cfg), rotated(lambda: fla_inputs(cfg, batch, seqlen, device, dtype)),
                 nsa_flops(cfg, batch, seqlen, window=False), "fla-core parallel_nsa, mean-pooled compression, no window")


def layer_hidden(cfg: BenchConfig) -> int:
    return cfg.hq * cfg.dv


def _layer_inputs(cfg, batch, seqlen, device, dtype):
    return (_leaf((batch, seqlen, layer_hidden(cfg)), device, dtype),)


def build_nsa_layer(cfg: BenchConfig, batch: int, seqlen: int, device, dtype) -> Built:
    """nsa.NativeSparseAttention with its projections, phi, gates and RoPE, width HQ * DV."""
    if not hasattr(nsa, "NativeSparseAttention"):
        raise Skip("nsa.NativeSparseAttention is not in this version")
    layer = nsa.NativeSparseAttention(layer_hidden(cfg), cfg.hq, cfg.hkv, cfg.dk, cfg.dv, sparsity=cfg.sparsity)
    layer = layer.to(device=device, dtype=dtype)
    return Built(layer, rotated(lambda: _layer_inputs(cfg, batch, seqlen, device, dtype)), None,
                 f"hidden={layer_hidden(cfg)}", params=list(layer.parameters()))


def build_dense_layer(cfg: BenchConfig, batch: int, seqlen: int, device, dtype) -> Built:
    """nsa.DenseAttention (the same projections and RoPE around causal SDPA), on cuDNN where it takes the call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not hasattr(nsa, "DenseAttention"):
        raise Skip("nsa.DenseAttention is not in this version")
    layer = nsa.DenseAttention(layer_hidden(cfg), cfg.hq, cfg.hkv, cfg.dk, cfg.dv).to(device=device, dtype=dtype)
    backends = [SDPBackend.CUDNN_ATTENTION] if device.type == "cuda" else [SDPBackend.MATH]

    def fn(x):
        with sdpa_kernel(backends):
            return layer(x)

    note = f"hidden={layer_hidden(cfg)}, SDPA {backends[0].name}"
    try:
        with torch.no_grad():
            fn(_layer_inputs(cfg, 1, 256, device, dtype)[0].detach())
    except RuntimeError:
        fn, note = layer, f"hidden={layer_hidden(cfg)}, SDPA backend of torch's choice ({backends[0].name} refused)"
    return Built(fn, rotated(lambda: _layer_inputs(cfg, batch, seqlen, device, dtype)), None, note,
                 params=list(layer.parameters()))


def cuda_graphed(fn: Callable, inputs: list[tuple]) -> tuple[Callable, str]:
    """fn replayed from one CUDA graph per input copy, as a serving engine runs a decode step: the time is the
    GPU's, without a host launch per kernel. Returns (fn or its replay, a note); a side whose capture fails is
    timed eagerly and says so. CPU inputs: fn as it is."""
    if not (isinstance(inputs[0][0], torch.Tensor) and inputs[0][0].is_cuda):
        return fn, ""
    graphs = {}
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for args in inputs:  # compiles and autotunes outside the capture
                fn(*args)
        torch.cuda.current_stream().wait_stream(stream)
        for args in inputs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn(*args)
            graphs[id(args[0])] = (graph, out)
    except Exception as error:  # any capture failure: the side is timed eagerly instead
        torch.cuda.synchronize()
        return fn, f"eager (CUDA graph capture failed: {type(error).__name__})"

    def replay(*args):
        graph, out = graphs[id(args[0])]
        graph.replay()
        return out

    return replay, "CUDA graph replay"


def build_nsa_decode(cfg: BenchConfig, batch: int, context: int, device, dtype, layers: int = 1) -> Built:
    """One new token per sequence against a cache of `context` tokens (the last of them the new one): the
    fused decode kernels on a GPU (replayed from a CUDA graph), the reference's sampled-row path on a CPU; with
    layers > 1, that many steps on their own caches per call (layered)."""
    from nsa.ops.decode import nsa_decode

    s = cfg.sparsity
    tc = s.num_cmp(context)

    def make():
        return (_leaf((batch, 1, cfg.hq, cfg.dk), device, dtype, False), nsa_gates(cfg, batch, 1, device, dtype, False),
                _leaf((batch, context, cfg.hkv, cfg.dk), device, dtype, False),
                _leaf((batch, context, cfg.hkv, cfg.dv), device, dtype, False),
                _leaf((batch, tc, cfg.hkv, cfg.dk), device, dtype, False),
                _leaf((batch, tc, cfg.hkv, cfg.dv), device, dtype, False))

    scale = 1 / math.sqrt(cfg.dk)
    if torch.device(device).type == "cuda":
        past = torch.full((batch,), context - 1, dtype=torch.int32, device=device)

        def fn(q, gates, k, v, k_cmp, v_cmp):
            return nsa_decode(q, gates, k, v, k_cmp, v_cmp, past, s, scale)

        note = "nsa.ops.decode.nsa_decode"
    else:
        last = torch.tensor([context - 1])

        def fn(q, gates, k, v, k_cmp, v_cmp):
            # The new query at the last position; the other positions' queries and gates are never read.
            q_all = q.new_zeros(batch, context, cfg.hq, cfg.dk)
            q_all[:, -1:] = q
            g_all = gates.new_zeros(batch, context, cfg.hq, 3)
            g_all[:, -1:] = gates
            return nsa.reference.nsa_forward(q_all, k, v, k_cmp, v_cmp, g_all, k, v, s, scale, rows=last)[0]

        note = "reference, sampled row"
    w = min(s.window, context)
    keys = tc + min(s.num_selected * s.slc_block, context) + w
    traffic = batch * cfg.hkv * keys * (cfg.dk + cfg.dv) * torch.finfo(dtype).bits // 8
    flops = batch * cfg.hq * (2 * keys * (cfg.dk + cfg.dv) + 2 * tc * cfg.dk)
    make, n, width = layered(make, layers, device)
    return _decode_built(each_layer(fn, width), rotated(make), n, (flops, 0), note, traffic)


def build_sdpa_decode(cfg: BenchConfig, batch: int, context: int, device, dtype, layers: int = 1) -> Built:
    """SDPA's dense decode step over the same context (q, K, V and o are its traffic); layers as build_nsa_decode."""
    def make():
        return (_leaf((batch, cfg.hq, 1, cfg.dk), device, dtype, False),
                _leaf((batch, cfg.hkv, context, cfg.dk), device, dtype, False),
                _leaf((batch, cfg.hkv, context, cfg.dv), device, dtype, False))

    make, n, width = layered(make, layers, device)
    inputs = rotated(make)
    # The new token is the last position: it sees the whole cache, so no causal mask; SDPA picks its backend.
    fn, note = sdpa_fn(list(_all_sdpa_backends()), inputs[0][:width], causal=False)
    flops = 2 * batch * cfg.hq * context * (cfg.dk + cfg.dv)
    traffic = batch * (cfg.hq + cfg.hkv * context) * (cfg.dk + cfg.dv) * torch.finfo(dtype).bits // 8
    return _decode_built(each_layer(fn, width), inputs, n, (flops, 0),
                         f"SDPA, backend of torch's choice {note}".strip(), traffic)


def _decode_built(fn, inputs: list[tuple], n: int, flops, note: str, traffic: int) -> Built:
    """A decode side whose calls run n layers' steps each, replayed from a CUDA graph per input copy on a GPU;
    flops and traffic are one step's."""
    fn, how = cuda_graphed(fn, inputs)
    per_call = f"{n} layers' steps per call, time per step" if n > 1 else ""
    return Built(fn, inputs, flops, ", ".join(x for x in (note, how, per_call) if x), bytes_fwd=traffic, layers=n)


def _all_sdpa_backends():
    from torch.nn.attention import SDPBackend

    return (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


class TokenClock:
    """A generate() streamer that notes when the host receives each put: the prompt, then every new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def build_generate(cfg: BenchConfig, batch: int, context: int, device, dtype, attn_impl: str, new_tokens: int,
                   overrides: tuple = ()) -> Built:
    """Greedy generate() of `new_tokens` tokens after a random prompt of `context` tokens, by NSAForCausalLM
    (attn_impl "nsa") or its dense twin ("dense"): NSAConfig.nsa_1b() with `overrides` and cfg's sparsity knobs,
    random weights in dtype. On a GPU both decode on an NSACache with cuda_graph (the first step runs eagerly and
    captures, the others replay), as a serving engine would. Its timer reports the decoding alone, per new token:
    generate() of settle + new_tokens tokens hands each token to a streamer that notes when the host receives it,
    and the time from token `settle` to the last one, over new_tokens, is the figure (the best of two runs, after
    one that compiles). The settle = 3 + d tokens are the prompt's first token and the steps that capture each kind
    of decode step (an NSA model captures one that runs phi, which comes once every d steps, and one that does not);
    new_tokens should be a multiple of d, so that phi's steps count in their share. tokens/s counts every sequence of
    the batch; prefill_ms is generate() of one token (the prompt)."""
    try:
        from nsa.models import NSAConfig, NSAForCausalLM
        from nsa.models.modeling_nsa import CACHE_FIELD
    except ImportError as error:
        raise Skip(f"the model needs transformers ({error})") from None
    settle = 3 + cfg.sparsity.cmp_stride
    config = NSAConfig.nsa_1b(**{"attn_impl": attn_impl, "sparsity": cfg.sparsity,
                                 "max_position_embeddings": context + settle + new_tokens, **dict(overrides)})
    torch.manual_seed(0)
    model = NSAForCausalLM(config).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(1, config.vocab_size, (batch, context), device=device)
    cuda = torch.device(device).type == "cuda"

    def generate(n: int, streamer=None) -> torch.Tensor:
        cache = {CACHE_FIELD: nsa.NSACache(capacity=context + n, cuda_graph=True)} if cuda else {}
        with torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, streamer=streamer, **cache)

    def seconds(n: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate(n)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def decoding_seconds() -> float:
        clock = TokenClock()
        generate(settle + new_tokens, clock)
        # times[0] is the prompt's, times[i] the i-th new token's (each handed over once it is on the host).
        if len(clock.times) != settle + new_tokens + 1:
            raise RuntimeError(f"generate() streamed {len(clock.times)} puts, expected {settle + new_tokens + 1}")
        return max(clock.times[-1] - clock.times[settle], 1e-9) / new_tokens

    def timer() -> dict:
        generate(settle)
        prefill = min(seconds(1) for _ in range(2))
        per_token = min(decoding_seconds() for _ in range(2))
        return {"ms": 1e3 * per_token, "tokens_per_s": batch / per_token, "prefill_ms": 1e3 * prefill,
                "new_tokens": new_tokens}

    params = sum(p.numel() for p in model.parameters())
    note = (f"NSAForCausalLM attn_impl={attn_impl}, {params / 1e9:.2f}B parameters, {config.num_hidden_layers} "
            f"layers, heads {config.num_attention_heads}/{config.num_key_value_heads}, greedy; ms per new token"
            + ("; decode steps replayed from a CUDA graph" if cuda else ""))
    return Built(generate, [(new_tokens,)], None, note, timer=timer)

