"""
Generation with lladapter's model, kept apart from it as Meta keeps generation.py beside model.py: sampling, the
decoding loop over the model's KV cache, its one-token step compiled, and several adapters served from one base in
one batch (AdapterBank). What a batch of sequences costs in memory is here too (bytes_per_sequence), for
generate.py's batch size and for the planner (tools/plan.py).
"""
import torch

# ----------------------------------------------------------------------------------------------------------
# Sampling and the decoding loop


def sample_next(logits, temperature: float, top_p: float, generator=None):
    # logits: (bsz, vocab). Greedy at temperature 0; otherwise nucleus sampling: draw from the smallest set of
    # most likely tokens whose probabilities sum to at least top_p.
    if temperature == 0:
        return logits.argmax(-1)
    probs, order = torch.softmax(logits / temperature, dim=-1).sort(dim=-1, descending=True)
    probs[probs.cumsum(-1) - probs > top_p] = 0  # keep a token if the ones before it sum to <= top_p
    choice = torch.multinomial(probs, 1, generator=generator)  # multinomial normalizes what is left
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(model, prompts, max_gen_len, temperature=0.1, top_p=0.75, eos_id=None, image=None,
             generator=None, on_token=None, compile=False, bank=None, rows=None, cache_len=None):
    """Continue each token list in `prompts`; returns the new tokens of each, up to and excluding EOS.

    eos_id: the id that ends a sequence, or a collection of them (Llama 3's instruct models: any of 128001, 128008
    and 128009); None: none does.

    Prompts of different lengths share one batch: all start at position 0, decoding starts at the shortest
    prompt's end, and a sequence still inside its prompt is fed its own next token instead of a sample, so each
    gets what it would get alone. on_token(step_tokens) sees each step's (bsz,) new tokens as they come.
    The loop never waits for the device except every few tokens, to see whether every sequence has ended.
    compile: run the one-token steps compiled (see compiled_step) over a cache of the static length cache_len
    (default: the call's own length, rounded up by static_cache_len), which the model keeps for the next call of the
    same shapes (model.clear_cache() frees it). bank, rows: each prompt answered with its own adapter of an
    AdapterBank, rows[i] its index there (0: the base model), all in one batch.
    """
    bsz, lengths = len(prompts), [len(p) for p in prompts]
    max_seq_len = model.args.max_seq_len
    if max(lengths) >= max_seq_len:
        raise ValueError(f"a prompt of {max(lengths)} tokens leaves no room in max_seq_len={max_seq_len}")
    device = model.tok_embeddings.weight.device
    stops = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    stop_ids = torch.tensor(sorted(stops), dtype=torch.long, device=device)
    start, end = min(lengths), min(max_seq_len, max(lengths) + max_gen_len)
    tokens = torch.full((bsz, end), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    tokens = tokens.to(device)
    in_prompt = tokens != -1
    ends = torch.tensor(lengths, device=device) + max_gen_len  # where each sequence's budget runs out
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    cache_len = cache_len or static_cache_len(end, max_seq_len)
    if compile and end > cache_len:
        raise ValueError(f"{max(lengths)} prompt and {max_gen_len} new tokens exceed the cache_len={cache_len}")
    prompt_kv = None if bank is None else bank.prompt_kv(torch.tensor(rows, dtype=torch.long, device=device))
    model.setup_cache(bsz, cache_len if compile else end, image, prompt_kv)
    try:
        # The prompts' common part in one forward, then one token at a time; logits only at the last position.
        logits = model(tokens[:, :start], 0, logits_at=slice(-1, None))  # (bsz, 1, vocab_size)
        position = torch.tensor([start], device=device)  # the compiled step's: a tensor, the same code every step
        for cur in range(start, end):
            next_token = sample_next(logits[:, -1], temperature, top_p, generator)
            next_token = torch.where(in_prompt[:, cur], tokens[:, cur], next_token)  # still in its prompt: feed that
            tokens[:, cur] = next_token
            if on_token is not None:
                on_token(next_token)
            done |= ~in_prompt[:, cur] & (torch.isin(next_token, stop_ids) | (cur + 1 >= ends))
            if cur + 1 == end or ((cur - start) % 8 == 7 and done.all()):  # a host sync every 8 tokens, not each
                break
            step = tokens[:, cur:cur + 1].clone(memory_format=torch.contiguous_format)  # (bsz, 1): strides (1, 1)
            logits = (compiled_step(model, bsz, cache_len, (id(bank), image is None))(step, position) if compile else
                      model(step, cur))
            position += 1
    finally:
        if not compile:  # a compiled step's cache stays, for the next call (see setup_cache)
            model.clear_cache()
    out = []
    for i, p in enumerate(tokens.tolist()):
        new = p[lengths[i]:min(lengths[i] + max_gen_len, end)]
        new = new[:new.index(-1)] if -1 in new else new
        out.append(new[:next((j for j, t in enumerate(new) if t in stops), len(new))])
    return out


def static_cache_len(length, max_seq_len):
    """The static cache a compiled call decodes over: its own length (the longest prompt plus the new tokens) rounded
    up to a power of two, at least 64, at most max_seq_len. Every compiled step attends over the whole static cache,
    so the model's context as a default would make a 40-token answer on Llama 3.1 read 131,072 positions per step;
    powers of two let calls of similar length share a graph, and a context of 131,072 has 12 of them at most."""
    return min(max_seq_len, max(64, 1 << (length - 1).bit_length()))


COMPILED = set()  # every compiled step's model, batch size, cache length and prompt state, in this process


def compiled_step(model, batch_size, cache_len, prompt_state=None):
    """The model compiled for one-token steps over a static cache: the same shapes at every step, so it compiles once
    per batch size and cache length. On a GPU with CUDA graphs ("reduce-overhead"): each step replays as one graph
    instead of launching every kernel (about 1,700 per token at 7B, which would leave batch-1 decoding bound by
    launch overhead, not memory). Kept in the model's __dict__ (not as a submodule, so not in its state_dict): it goes
    when the model goes. Dynamo counts the graphs of every model, shape and prompt state (prompt_state: what decides
    it, as an AdapterBank) against one limit per process (8), past which it would fail or decode eagerly: the limit
    grows with the ones compiled here."""
    if "compiled_step" not in model.__dict__:
        mode = "reduce-overhead" if model.tok_embeddings.weight.is_cuda else "default"
        model.__dict__["compiled_step"] = torch.compile(model, mode=mode, dynamic=False, fullgraph=True)
    COMPILED.add((id(model), batch_size, cache_len, prompt_state))
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # its name before 2.6
    setattr(config, limit, max(getattr(config, limit), 8 + len(COMPILED)))
    return model.__dict__["compiled_step"]


# ----------------------------------------------------------------------------------------------------------
# What a batch costs


def bytes_per_sequence(model, cache_len, fused=None):
    """The memory one sequence of generate() needs at most: its KV cache, its prefill's largest transients (the
    feed-forward's hidden activations, a row of fp32 logits) and, where no fused attention kernel takes the prefill
    (then torch's math kernel runs it, in fp32: on a CPU, and on GPUs for some shapes), the math kernel's scores and
    weights, 2 x n_heads x cache_len^2 fp32 values. fused: whether a fused kernel takes the prefill; None: asked of
    torch for the model's own device and shapes."""
    a, weight, args = model.layers[0].attention, model.tok_embeddings.weight, model.args
    cache = 2 * args.n_layers * cache_len * a.n_kv_heads * a.head_dim * weight.element_size()
    hidden = model.layers[0].feed_forward.w1.weight.shape[0]
    prefill = cache_len * (3 * hidden + 4 * args.dim) * weight.element_size() + 4 * args.vocab_size
    if fused is None:  # the prefill's call: causal, no mask, grouped heads where the model has them
        q, k = (torch.zeros(1, heads, 8, a.head_dim, dtype=weight.dtype, device=weight.device)
                for heads in (a.n_heads, a.n_kv_heads))
        params = torch.backends.cuda.SDPAParams(q, k, k, None, 0.0, True, a.n_kv_heads != a.n_heads)
        fused = weight.is_cuda and any(can(params) for can in (torch.backends.cuda.can_use_flash_attention,
                                                               torch.backends.cuda.can_use_efficient_attention,
                                                               torch.backends.cuda.can_use_cudnn_attention))
    return cache + prefill + (0 if fused else 2 * a.n_heads * cache_len ** 2 * 4)


def batch_that_fits(model, cache_len, free_bytes, most=32):
    """How many sequences generate() decodes at once in free_bytes, `most` at the most (see bytes_per_sequence)."""
    return int(min(most, free_bytes / bytes_per_sequence(model, cache_len)))


# ----------------------------------------------------------------------------------------------------------
# Several adapters on one base, in one batch: generate(bank=, rows=)


class AdapterBank:
    """Several text-only adapters of one base at once, for batches whose rows each use their own (generate's bank
    and rows). A text-only adapter's prompt keys and values depend on nothing but the adapter, so they are projected
    here once, through each layer's frozen wk and wv, in the base's dtype; each row then attends to its adapter's
    keys with its adapter's gates. Row index 0 is the base model itself: its gates are zero everywhere, which makes
    it exactly the base (the zero-init property). An adapter's gate is zero in the layers it does not adapt, and
    adapters of different K mix: the keys past a row's own K are masked out.

    adapters: {name: checkpoint.Adapter}, each with its adapter_len (K), adapter_layer (L) and tensors
    (adapter_query.weight [L*K, dim], the gates layers.{i}.attention.gate [1, n_heads, 1, 1] of its top L layers).
    Its memory, nbytes: K x L x 2 x n_kv_heads x head_dim values per row (K and L the largest among them), a row
    for each adapter and one (zeros) for the base: nbytes_per_row each."""

    @torch.no_grad()  # the base's weights may require gradients: the bank keeps no graph of its projections
    def __init__(self, model, adapters: dict):
        self.names = ["base", *adapters]
        n_layers, weight = model.args.n_layers, model.tok_embeddings.weight
        K = max(a.adapter_len for a in adapters.values())
        mixed = len({a.adapter_len for a in adapters.values()}) > 1  # adapters of other K: a mask over the keys
        self.first = n_layers - max(a.adapter_layer for a in adapters.values())  # below it no adapter reaches
        self.layers = {}
        for i in range(self.first, n_layers):
            a = model.layers[i].attention
            keys = torch.zeros(len(self.names), a.n_kv_heads, K, a.head_dim, dtype=weight.dtype, device=weight.device)
            values = torch.zeros_like(keys)
            seen = torch.ones(len(self.names), 1, 1, K, dtype=torch.bool, device=weight.device)
            gates = torch.zeros(len(self.names), a.n_heads, 1, 1, device=weight.device)  # fp32, as the adapter's
            self.layers[i] = (keys, values, gates, seen if mixed else None)
        for n, adapter in enumerate(adapters.values(), 1):
            L, k, first = adapter.adapter_layer, adapter.adapter_len, n_layers - adapter.adapter_layer
            prompts = adapter.tensors["adapter_query.weight"].to(weight.device).view(L, k, -1)  # one copy each
            for i in range(first, n_layers):  # its adapted layers: its K prompts of each, through wk and wv
                keys, values, gates, seen = self.layers[i]
                pk, pv = model.layers[i].attention.prompt_keys_values(prompts[None, i - first], weight.dtype, 1)
                keys[n, :, :k], values[n, :, :k] = pk[0], pv[0]  # pk: (1, n_kv_heads, k, head_dim)
                gates[n] = adapter.tensors[f"layers.{i}.attention.gate"][0]
                if mixed:
                    seen[n, ..., k:] = False
        self.nbytes = sum(keys.nbytes + values.nbytes for keys, values, _, _ in self.layers.values())
        self.nbytes_per_row = self.nbytes / len(self.names)

    def prompt_kv(self, rows):
        """{layer: (keys, values, gate, seen)} for a batch whose rows use these bank indices (a (bsz,) LongTensor),
        as model.setup_cache takes it; the layers below the first any adapter reaches are the base's alone."""
        return {i: tuple(t[rows] if t is not None else None for t in state) for i, state in self.layers.items()}
