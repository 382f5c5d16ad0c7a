"""Generation (ds_parallel/inference) against independent references, fp32 on CPU.

- Greedy decoding over the compressed cache equals `transformers`' `generate()` on tiny
  DeepSeek-V2/V3 checkpoints written by `transformers`, token for token, with the same
  per-token log-probabilities.
- The cache holds what the papers say per token and layer (MLA: kv_lora_rank +
  qk_rope_head_dim values; MHA/GQA: 2 x n_kv_heads x head_dim), measured from the tensors.
- MTP speculative decoding (V3 §2.2, §5.4.3) is lossless: greedy output identical to plain
  decoding, drafts accepted exactly as often as a cache-free reference says, and sampled
  output distributed as plain sampling (chi-square against each other and against the
  model's exact two-token distribution).
- Sampling semantics: temperature, top-k, top-p against a sort-based reference; a step's
  rows sampled together equal each row alone (probabilities bit for bit, tokens as the
  per-row float64 inversion of its own generator, also for a 129,280-token row on two
  threads); a seeded request independent of its batch; stops, lengths and invalid settings.
"""
import math

import pytest
import torch

from ds_parallel.config.load import config_from_dict
from ds_parallel.inference import Generator, SamplingParams
from ds_parallel.inference.sampling import choose, sampling_probs
from ds_parallel.model import build_model
from ds_parallel.model.cache import KVCache, MLACache, ModelCache
from ds_parallel.parallel.groups import ParallelContext

CTX = ParallelContext.single()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Decoding these models is a chain of tiny ops: a second intra-op thread only adds
    contention on shared cores (measured 2.6 s -> 21 s for one run under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_v3(vocab_size: int = 128, mtp_depth: int = 1, std: float = 0.1):
    """debug_v3 (MLA, MoE, MTP) with weights far from the 0.006 init, so that the model's
    distributions are far from uniform and greedy choices are not near-tied."""
    cfg = config_from_dict({"model": dict(preset="debug_v3", vocab_size=vocab_size, mtp_depth=mtp_depth,
                                          max_seq_len=64, init_std=std)}).model
    return build_model(cfg, CTX, seed=0).eval()


def random_prompts(n: int, lengths: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=g)
    return [torch.randint(0, vocab, (int(s),), generator=g).tolist() for s in sizes]


def greedy(max_new_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0, **kw)


# ---------------------------------------------------------------------------- 1. transformers


@pytest.mark.parametrize("case", ["v2_greedy", "v3_qlora_grouped"])
def test_greedy_matches_transformers_generate(case, tmp_path):
    """Ten prompts of lengths 3..12 through 4 cache slots (slots are reused), 10 new tokens
    each, against HF `generate` on the left-padded batch. Every step's top-2 logit gap in
    HF is checked to exceed 1e-4 first (measured minimum: 3.4e-3 for V2, 1.2e-2 for V3), so
    exact token equality is a fair demand; log-probabilities agree to 1e-5."""
    from tests.unit.test_hf import CASES, hf_classes, write_hf  # skips without transformers

    from ds_parallel.interop.hf import load_hf

    src = write_hf(case, tmp_path / "hf")
    prompts = [torch.randint(1, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (7, 3, 12, 5, 10, 4, 9, 11, 6, 8)]
    width, new = max(map(len, prompts)), 10
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    hf = hf_classes(CASES[case][0])[1].from_pretrained(src).eval()
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                          min_new_tokens=new, eos_token_id=None, pad_token_id=0, output_logits=True,
                          return_dict_in_generate=True)
    tokens = ref.sequences[:, width:]
    logits = torch.stack(ref.logits, 1).float()  # (B, new, V)
    top2 = logits.topk(2, -1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-4, "near-tied argmax: pick another seed"
    ref_logprobs = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    out = Generator(load_hf(str(src)), CTX, max_batch=4, max_len=32).generate(prompts, greedy(new))
    for i, c in enumerate(out):
        assert c.prompt_ids == prompts[i] and c.finish_reason == "length"
        assert c.token_ids == tokens[i].tolist(), f"prompt {i}"
        torch.testing.assert_close(torch.tensor(c.logprobs), ref_logprobs[i], rtol=0, atol=1e-5)
        assert c.sampling_logprobs == [0.0] * new


def test_dense_greedy_matches_full_forward():
    """The MHA/GQA cache path: cached greedy decoding equals argmax of a full forward over
    the whole sequence, recomputed from scratch for every new token."""
    cfg = config_from_dict({"model": dict(preset="debug_dense_gqa", max_seq_len=64, init_std=0.1)}).model
    model = build_model(cfg, CTX, seed=0).eval()
    prompts = random_prompts(5, (1, 9), cfg.vocab_size, seed=4)
    out = Generator(model, CTX, max_batch=2, max_len=32).generate(prompts, greedy(6))
    for prompt, c in zip(prompts, out):
        seq = list(prompt)
        for token, logprob in zip(c.token_ids, c.logprobs):
            with torch.no_grad():
                logp = model(torch.tensor([seq])).logits[0, -1].log_softmax(-1)
            assert token == int(logp.argmax())
            assert abs(logprob - float(logp[token])) < 1e-5
            seq.append(token)


# ---------------------------------------------------------------------------- 2. cache size


def test_cache_bytes_per_token():
    """MLA: kv_lora_rank + qk_rope_head_dim = 32 + 16 values per token and layer (DeepSeek-V2
    §2.1.4; V3: 512 + 64), 192 bytes in fp32, 96 in bf16. MHA: 2 x 4 heads x 32 dims; GQA:
    2 x 2 x 32. Measured twice: the caches' own report and the allocated tensors' bytes over
    slots x positions."""
    def measured(cache) -> int:
        total = sum(t.numel() * t.element_size() for t in cache.tensors.values())
        slots, length = next(iter(cache.tensors.values())).shape[:2]
        assert total % (slots * length) == 0
        return total // (slots * length)

    v3 = tiny_v3(mtp_depth=2)
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        for cache in (ModelCache(v3, 3, 10, dtype=dtype), ModelCache(v3.to(dtype), 3, 10)):
            layers = [*cache.layers.values(), *cache.mtp]
            assert len(cache.layers) == 2 and len(cache.mtp) == 2
            for layer in layers:
                assert isinstance(layer, MLACache) and layer.kv.dtype == dtype
                assert layer.bytes_per_token == measured(layer) == (32 + 16) * size
            assert cache.bytes_per_token == 2 * (32 + 16) * size  # main layers only
        v3.float()

    head_dim = 128 // 4  # dim / n_heads
    for preset, kv_heads in (("debug_dense", 4), ("debug_dense_gqa", 2)):
        cfg = config_from_dict({"model": dict(preset=preset)}).model
        dense = build_model(cfg, CTX, seed=0)
        for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
            cache = ModelCache(dense, 2, 5, dtype=dtype)
            for layer in cache.layers.values():
                assert isinstance(layer, KVCache) and layer.tensors["k"].shape[2:] == (kv_heads, head_dim)
                assert layer.bytes_per_token == measured(layer) == 2 * kv_heads * head_dim * size


# ---------------------------------------------------------------------------- 3. speculative, greedy


def bigram_drafter(model, alpha: float = 0.01):
    """Make drafts often right: every block's output projections (attention wo, MLP and
    expert w2) scaled by `alpha`, so each position's prediction is mostly a function of its
    own token, and each MTP depth reads mostly the embedding (eh_proj = [I, 0.1 W]), so it
    predicts that same function of the token it is given. The remaining alpha-sized context
    terms make some drafts wrong, and keep the drafts dependent (a little) on the MTP caches
    and on the hidden states passed between depths."""
    dim = model.cfg.dim
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("wo.weight", "w2.weight", "experts.w2")):
                p.mul_(alpha)
        for depth in model.mtp:
            w = depth.eh_proj.weight
            w[:, :dim] = torch.eye(dim)
            w[:, dim:] *= 0.1
    return model


def reference_acceptance(model, prompts, outputs, k: int) -> tuple[list[int], list[int], int]:
    """(drafted, accepted) per draft position, and verification forwards summed over the
    sequences, of greedy speculative decoding, replayed from the final tokens with full
    forwards (no cache). A step starts from seq = prompt +
    generated; depth j drafts at the last cached position, len(seq) - 2, from h^{j-1} there
    and the token after it (seq[-1] for j = 1, then the previous draft); drafts are checked
    in order against the greedy tokens, and the step gains the accepted ones plus one.
    Sequences are batched right-padded: padding never reaches earlier positions (causal
    attention, no expert capacity in eval)."""
    def depth_logits(m, trunk):
        h = m.norm(trunk.h)
        hidden, _ = m.mtp(h, trunk.emb, trunk.freqs_cis)
        return [m.head(x) for x in hidden]

    drafted, accepted, steps = [0] * k, [0] * k, 0
    done = [1] * len(prompts)  # tokens generated so far; the first comes from the prefill
    while active := [i for i, gen in enumerate(outputs) if done[i] < len(gen)]:
        seqs = [prompts[i] + outputs[i][: done[i]] for i in active]
        drafts = [[] for _ in active]
        for j in range(k):
            width = max(map(len, seqs)) + j + len(model.mtp)  # every depth has a position to spare
            ids = torch.tensor([s + d + [0] * (width - len(s) - len(d)) for s, d in zip(seqs, drafts)])
            with torch.no_grad():
                logits = model(ids, objective=depth_logits)[j]
            for b, seq in enumerate(seqs):
                drafts[b].append(int(logits[b, len(seq) - 2].argmax()))
        steps += len(active)
        for b, i in enumerate(active):
            for j in range(k + 1):
                if j == k:
                    done[i] += 1
                    break
                drafted[j] += 1
                hit = drafts[b][j] == outputs[i][done[i]]
                accepted[j] += hit
                done[i] += 1
                if not hit or done[i] >= len(outputs[i]):
                    break
    return drafted, accepted, steps


STOP = {"random": 107, "bigram": 111}  # tokens that the greedy outputs often contain


@pytest.mark.parametrize("drafter", ["random", "bigram"])
def test_speculative_greedy_is_identical_to_plain(drafter):
    """100 prompts of lengths 1..20, 8 new tokens, 16 slots, on a 2-depth MTP model: with 1
    and 2 drafts the output equals plain decoding token for token (log-probabilities to
    1e-5, the same finish reasons; every third request has a stop token, which ends about
    ten of them early). The acceptance counts equal a cache-free replay's exactly (this
    catches h^0 not kept at prefill or verification; a stale depth-2 cache entry changes no
    count here). Measured acceptance per draft position, random MTP weights: [0.006] and
    [0.006, 0.0]; `bigram_drafter`: [0.63] and [0.57, 0.59], 1.53 and 1.77 tokens per step."""
    model = tiny_v3(mtp_depth=2)
    if drafter == "bigram":
        bigram_drafter(model)
    prompts = random_prompts(100, (1, 20), model.cfg.vocab_size, seed=3)
    params = [greedy(8, stop_token_ids=(STOP[drafter],) if i % 3 == 0 else ()) for i in range(len(prompts))]
    runs = {}
    for k in (0, 1, 2):
        gen = Generator(model, CTX, max_batch=16, max_len=40)
        runs[k] = (gen.generate(prompts, params, speculative=k), gen.stats)
    plain = runs[0][0]
    stops = sum(c.finish_reason == "stop" for c in plain)
    assert 5 <= stops <= 30, stops
    for k in (1, 2):
        out, stats = runs[k]
        for a, b in zip(plain, out):
            assert (b.token_ids, b.finish_reason) == (a.token_ids, a.finish_reason)
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=0, atol=1e-5)
        # A stop token ends the replay's sequence where it ends the engine's: the output's end.
        replay = reference_acceptance(model, prompts, [c.token_ids for c in plain], k)
        assert (stats.drafted, stats.accepted, stats.main_steps) == replay
        assert stats.tokens == sum(len(c.token_ids) for c in plain)
        assert stats.tokens_per_step == (stats.tokens - len(prompts)) / stats.main_steps
        assert stats.drafted[0] > 0 and len(stats.acceptance) == k
        if drafter == "bigram":
            assert 0.5 < stats.acceptance[0] < 0.95 and 0.3 < stats.acceptance[-1] < 0.95, stats.acceptance
            assert stats.tokens_per_step > 1.5
        else:
            assert stats.acceptance[0] < 0.05, stats.acceptance


# ---------------------------------------------------------------------------- 4. speculative, sampled


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(..., V) logits -> the sampling distribution, written independently of sampling.py:
    softmax(logits / T); keep the k largest; then keep the largest tokens in order until
    their mass reaches top_p; renormalise."""
    probs = (logits.double() / temperature).softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if top_k:
        keep[..., top_k:] = False
    sorted_probs = sorted_probs * keep
    sorted_probs = sorted_probs / sorted_probs.sum(-1, keepdim=True)
    reached = sorted_probs.cumsum(-1) >= top_p - 1e-12
    first = reached.long().argmax(-1, keepdim=True)  # the first rank at which the mass reaches top_p
    keep &= torch.arange(probs.shape[-1]) <= first
    out = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    return out / out.sum(-1, keepdim=True)


def chi2_sf(stat: float, dof: int) -> float:
    """P(chi2_dof >= stat): the regularised upper incomplete gamma Q(dof/2, stat/2)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def pooled(counts: torch.Tensor, probs: torch.Tensor, n: int, min_expected: float = 5.0):
    """Cells with n * p >= min_expected kept, the rest pooled into one: (counts, probs)."""
    big = probs * n >= min_expected
    return (torch.cat([counts[big], counts[~big].sum().view(1)]),
            torch.cat([probs[big], probs[~big].sum().view(1)]))


def goodness_of_fit(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = int(counts.sum())
    counts, probs = pooled(counts, probs, n)
    expected = probs * n
    used = expected > 0
    if counts[~used].sum() > 0:  # a sample where the distribution has no mass
        return 0.0
    stat = float(((counts[used] - expected[used]) ** 2 / expected[used]).sum())
    return chi2_sf(stat, int(used.sum()) - 1)


def homogeneity(a: torch.Tensor, b: torch.Tensor, probs: torch.Tensor) -> float:
    """Two samples from one distribution? Cells pooled by the exact probabilities (fixed
    before looking at the data)."""
    a, _ = pooled(a, probs, int(a.sum()))
    b, _ = pooled(b, probs, int(b.sum()))
    table = torch.stack([a, b]).double()
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    return chi2_sf(float(((table - expected) ** 2 / expected).sum()), table.shape[1] - 1)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.8, 6, 0.9)])
def test_speculative_sampling_is_lossless(temperature, top_k, top_p):
    """A V3 with 16 tokens and one random MTP depth; the first two tokens after a fixed
    prompt, N = 3000 requests per method (seeds 0..N-1 plain, N..2N-1 speculative). The
    second token goes through draft acceptance or the residual draw. Cells with expected
    count < 5 are pooled. Measured p-values (plain vs exact, speculative vs exact, plain vs
    speculative): T=1: 0.25, 0.32, 0.50; T=0.8, top_k=6, top_p=0.9: 0.93, 0.35, 0.63.
    Each must exceed 0.001. The drafts are poor on purpose: exact acceptance
    E_t1[sum_x min(p, q)] = 0.538 (T=1) and 0.280, measured 0.553 and 0.275 (within 4
    sigma); the "every draft kept" distribution p(t1) q(t2 | t1) is rejected (p < 1e-10),
    so a sampler that skipped the rejection step would fail."""
    n, vocab, prompt = 3000, 16, [3, 1, 4, 1, 5]
    model = tiny_v3(vocab_size=vocab)

    def heads(m, trunk):
        h = m.norm(trunk.h)
        hidden, _ = m.mtp(h, trunk.emb, trunk.freqs_cis)
        return m.head(h), m.head(hidden[0])

    with torch.no_grad():
        first = model(torch.tensor([prompt])).logits[0, -1]
        main, mtp = model(torch.tensor([prompt + [t] for t in range(vocab)]), objective=heads)
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    p1 = reference_probs(first, **settings)  # (V,)
    p2 = reference_probs(main[:, -1], **settings)  # (V, V): row t1
    q2 = reference_probs(mtp[:, -1], **settings)  # depth 1 at the prompt's last position, reading t1
    exact = (p1[:, None] * p2).flatten()
    all_kept = (p1[:, None] * q2).flatten()
    acceptance = float((p1 * torch.minimum(p2, q2).sum(-1)).sum())

    counts, outputs = {}, {}
    for k in (0, 1):
        gen = Generator(model, CTX, max_batch=512, max_len=16)
        params = [SamplingParams(max_new_tokens=2, seed=k * n + i, **settings) for i in range(n)]
        outputs[k] = gen.generate([prompt] * n, params, speculative=k)
        pairs = torch.tensor([c.token_ids for c in outputs[k]])
        counts[k] = torch.bincount(pairs[:, 0] * vocab + pairs[:, 1], minlength=vocab * vocab).double()
        if k:
            assert gen.stats.drafted == [n]
            measured = gen.stats.acceptance[0]
    p_plain, p_spec = goodness_of_fit(counts[0], exact), goodness_of_fit(counts[1], exact)
    p_both = homogeneity(counts[0], counts[1], exact)
    assert min(p_plain, p_spec, p_both) > 1e-3, (p_plain, p_spec, p_both)
    assert goodness_of_fit(counts[1], all_kept) < 1e-10
    assert 0.2 < acceptance < 0.8
    assert abs(measured - acceptance) < 4 * math.sqrt(acceptance * (1 - acceptance) / n), (measured, acceptance)

    # Both log-probabilities of every token, the residual draws' included.
    for c in outputs[1][:200]:
        t1, t2 = c.token_ids
        want = [float(first.log_softmax(-1)[t1]), float(main[t1, -1].log_softmax(-1)[t2])]
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(want), rtol=0, atol=1e-5)
        want = [math.log(p1[t1]), math.log(p2[t1, t2])]
        torch.testing.assert_close(torch.tensor(c.sampling_logprobs), torch.tensor(want), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- 5. sampling semantics


def test_temperature_top_k_top_p_against_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    for temperature in (0.5, 1.0, 2.0):
        probs = sampling_probs(logits, [SamplingParams(temperature=temperature)] * 6)
        torch.testing.assert_close(probs, (logits / temperature).softmax(-1))
    assert torch.equal(sampling_probs(logits, [SamplingParams(temperature=0)] * 6),
                       torch.nn.functional.one_hot(logits.argmax(-1), 50).float())
    for k in (1, 5, 49, 50, 80):
        probs = sampling_probs(logits, [SamplingParams(temperature=0.7, top_k=k)] * 6)
        assert ((probs > 0).sum(-1) == min(k, 50)).all()
        assert torch.equal(probs.topk(min(k, 50)).indices.sort().values, logits.topk(min(k, 50)).indices.sort().values)
        torch.testing.assert_close(probs, reference_probs(logits, 0.7, top_k=k).float())
    for top_p in (0.05, 0.3, 0.5, 0.9, 0.99, 1.0):
        probs = sampling_probs(logits, [SamplingParams(temperature=1.3, top_p=top_p)] * 6)
        full = (logits / 1.3).softmax(-1)
        for row, base in zip(probs, full):
            kept = (row > 0).nonzero().flatten()
            mass = base[kept].sum()
            assert mass >= top_p - 1e-6 and mass - base[kept].min() < top_p  # reaches p; one fewer does not
            assert base[kept].min() >= torch.cat([base[row == 0], torch.zeros(1)]).max()  # the most likely ones
            torch.testing.assert_close(row[kept], base[kept] / mass)
        torch.testing.assert_close(probs, reference_probs(logits, 1.3, top_p=top_p).float())
    # Exact boundaries: the mass 0.5 reaches 0.5 with one token; 0.75 needs two, 0.81 three.
    logits = torch.tensor([0.3, 0.5, 0.05, 0.15]).log().view(1, 4)
    for top_p, kept in ((0.5, {1}), (0.75, {0, 1}), (0.81, {0, 1, 3}), (0.96, {0, 1, 2, 3})):
        probs = sampling_probs(logits, [SamplingParams(top_p=top_p)])[0]
        assert set((probs > 0).nonzero().flatten().tolist()) == kept, top_p
    # Order: temperature first, then top-k, then top-p over the renormalised top-k.
    logits = torch.randn(4, 30, generator=g) * 2
    probs = sampling_probs(logits, [SamplingParams(temperature=0.6, top_k=8, top_p=0.7)] * 4)
    torch.testing.assert_close(probs, reference_probs(logits, 0.6, top_k=8, top_p=0.7).float())


def reference_draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """The per-row definition of a draw, written independently of sampling.py: one float64
    uniform u of the row's generator, then the first token with mass whose float64
    cumulative probability reaches u times the total."""
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    cdf = probs.double().cumsum(0)
    return int(((cdf >= u * float(cdf[-1])) & (probs > 0)).nonzero()[0])


def test_batched_sampling_equals_each_row_alone():
    """A decode step's rows sampled together (settings mixed in one batch, greedy rows among
    them, tied logits, a vocabulary sliced from a padded one) against each row alone: the
    same probabilities bit for bit, and over three steps the same tokens as the per-row
    float64 inversion of the same generator streams; greedy rows draw nothing. 576 draws."""
    g = torch.Generator().manual_seed(0)
    settings = [dict(temperature=1.0), dict(top_p=0.95), dict(temperature=0.7, top_k=20, top_p=0.9),
                dict(temperature=0.0), dict(temperature=1.3, top_k=5), dict(temperature=0.6, top_p=0.5)]
    for vocab, padded in ((48, 48), (1000, 1024)):
        params = [SamplingParams(**settings[i % len(settings)]) for i in range(64)]
        gens = [torch.Generator().manual_seed(i) for i in range(64)]
        refs = [torch.Generator().manual_seed(i) for i in range(64)]
        for step in range(3):
            logits = (torch.randn(64, padded, generator=g) * 3)[:, :vocab]
            if step == 1:
                logits = (logits * 2).round() / 2  # ties
            probs = sampling_probs(logits, params)
            tokens = choose(probs, params, gens).tolist()
            for i, p in enumerate(params):
                alone = sampling_probs(logits[i:i + 1], [p])[0]
                assert torch.equal(probs[i], alone), (vocab, step, i)
                want = int(alone.argmax()) if p.greedy else reference_draw(alone, refs[i])
                assert tokens[i] == want, (vocab, step, i)
        for gen, ref in zip(gens, refs):  # the streams are where the per-row draws left them
            assert torch.rand((), generator=gen, dtype=torch.float64) == torch.rand((), generator=ref,
                                                                                    dtype=torch.float64)


def test_top_p_row_is_the_same_alone_and_in_a_batch_on_two_threads():
    """Top-p renormalises by the kept mass. A plain row sum over a 129,280-token row (V3's
    vocabulary) is split over threads when the row is alone, not in a batch, and so differs
    in the last bit for about half the rows; the kept mass summed in rank order does not."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 129_280, generator=g) * 2
    params = [SamplingParams(top_p=0.95)] * 8
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batch = sampling_probs(logits, params)
        for i in range(8):
            assert torch.equal(batch[i], sampling_probs(logits[i:i + 1], params[:1])[0]), i
    finally:
        torch.set_num_threads(threads)


def test_seeded_request_does_not_depend_on_its_batch():
    """One seeded request (T=0.9, top-k 40) alone in one slot, and among 7 other requests
    (greedy, other seeds, other lengths, some stopping early) in 3 and 8 slots, at several
    places in the list: the same tokens; log-probabilities to 1e-5. Also with speculation."""
    model = tiny_v3()
    mine = ([5, 6, 7], SamplingParams(max_new_tokens=12, temperature=0.9, top_k=40, seed=11))
    others = [(p, SamplingParams(max_new_tokens=3 + i, temperature=0.0 if i % 2 else 1.0, seed=100 + i,
                                 stop_token_ids=(int(i),)))
              for i, p in enumerate(random_prompts(7, (1, 15), 128, seed=8))]
    for speculative in (0, 1):
        alone = Generator(model, CTX, max_batch=1, max_len=40).generate([mine[0]], mine[1], speculative)[0]
        assert alone.finish_reason == "length" and len(set(alone.token_ids)) > 6  # really sampled
        for max_batch, place in ((3, 0), (3, 5), (8, 7), (8, 2)):
            batch = others[:place] + [mine] + others[place:]
            out = Generator(model, CTX, max_batch=max_batch, max_len=40).generate(
                [p for p, _ in batch], [s for _, s in batch], speculative)[place]
            assert out.token_ids == alone.token_ids, (speculative, max_batch, place)
            torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(alone.logprobs), rtol=0, atol=1e-5)
            torch.testing.assert_close(torch.tensor(out.sampling_logprobs), torch.tensor(alone.sampling_logprobs),
                                       rtol=0, atol=1e-5)


def test_stop_tokens_stop_strings_and_length():
    model = tiny_v3()
    gen = Generator(model, CTX, max_batch=4, max_len=40, detokenize=lambda ids: "".join(chr(97 + i % 26) for i in ids))
    prompts = random_prompts(4, (2, 9), 128, seed=5)
    free = gen.generate(prompts, greedy(12))
    assert all(c.finish_reason == "length" and len(c.token_ids) == 12 for c in free)
    assert [c.finish_reason for c in gen.generate(prompts, greedy(1))] == ["length"] * 4

    for c, prompt in zip(free, prompts):
        # A stop token first generated at step j: the output ends there, the token kept.
        j = next(j for j in range(3, 12) if c.token_ids[j] not in c.token_ids[:j])
        unused = next(t for t in range(128) if t not in c.token_ids)
        out = gen.generate([prompt], greedy(12, stop_token_ids=(unused, c.token_ids[j])))[0]
        assert (out.token_ids, out.finish_reason) == (c.token_ids[: j + 1], "stop")
        # A stop string across the tokens j-1 and j: output up to the first token completing it.
        text = gen.detokenize(c.token_ids)
        stop = text[j - 1: j + 1]
        end = next(i for i in range(12) if stop in gen.detokenize(c.token_ids[: i + 1]))
        out = gen.generate([prompt], greedy(12, stop_strings=("zzzzz", stop)))[0]
        assert (out.token_ids, out.finish_reason) == (c.token_ids[: end + 1], "stop")
        assert end <= j


def test_plain_decoding_reports_one_token_per_step():
    """tokens_per_step counts decode forwards only, and so leaves out the token each prefill
    yields: exactly 1 without speculation (not 8/7 for 8 tokens)."""
    model = tiny_v3()
    gen = Generator(model, CTX, max_batch=4, max_len=40)
    gen.generate(random_prompts(6, (1, 9), 128, seed=6), greedy(8))
    assert (gen.stats.tokens, gen.stats.main_steps, gen.stats.tokens_per_step) == (48, 42, 1.0)


@pytest.mark.parametrize("fields, name", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_invalid_sampling_params_name_the_field(fields, name):
    with pytest.raises(ValueError, match=rf"^sampling {name}=\S+ is invalid: ") as err:
        SamplingParams(**fields)
    assert "\n" not in str(err.value)


def test_invalid_requests_are_refused():
    model = tiny_v3()
    gen = Generator(model, CTX, max_batch=2, max_len=20)
    with pytest.raises(ValueError, match=r"speculative=2 .* the model has 1"):
        gen.generate([[1, 2]], greedy(3), speculative=2)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate([[1], []], greedy(3))
    with pytest.raises(ValueError, match=r"prompt 0: 15 tokens \+ max_new_tokens=5 \+ 1 drafts exceed the 20"):
        gen.generate([[1] * 15], greedy(5), speculative=1)
    gen.generate([[1] * 15], greedy(5))  # fits without the draft
    with pytest.raises(ValueError, match="stop_strings need a detokenize"):
        gen.generate([[1, 2]], greedy(3, stop_strings=("a",)))
