"""The causal token-only n-gram tilt (#2135, issue 19): the vectorised pass equals the left-to-right rule, a hint
never reads its target or anything after it (C1), the tilted distribution is normalised over the whole
vocabulary (C2), and TTT adapts on the untilted loss."""
from __future__ import annotations

import collections
import math

import pytest
import torch

import train_gpt as tg

CPU = torch.device("cpu")


def reference_hints(tokens: list[int], order: int, threshold: float) -> list[int]:
    """The rule, one position at a time: read the context's table, then add the position to it."""
    ctx_n, pair_n, top = collections.Counter(), collections.Counter(), {}
    out = [-1] * len(tokens)
    c = order - 1
    for i in range(c, len(tokens)):
        k, y = tuple(tokens[i - c:i]), tokens[i]
        if ctx_n[k] and top[k][1] >= threshold * ctx_n[k]:
            out[i] = top[k][0]
        ctx_n[k] += 1
        pair_n[k, y] += 1
        if k not in top or pair_n[k, y] > top[k][1]:
            top[k] = (y, pair_n[k, y])
    out[0] = -1
    return out


def _cfg(**over):
    return tg.load_config({k.upper(): str(v) for k, v in over.items()})[0]


@pytest.mark.parametrize("order,threshold,vocab", [(2, 0.8, 3), (3, 0.6, 4), (4, 0.8, 3), (16, 0.8, 2)])
def test_the_vectorised_pass_is_the_left_to_right_rule(order, threshold, vocab):
    cfg = _cfg(ngram_tilt_order=order, ngram_tilt_threshold=threshold)
    g = torch.Generator().manual_seed(order)
    for _ in range(3):
        toks = torch.randint(0, vocab, (2500,), generator=g)
        h = tg.ngram_hints(toks, cfg, CPU)
        ref = reference_hints(toks.tolist(), order, threshold)
        assert h.hint.tolist() == ref and h.fired == sum(r >= 0 for r in ref) > 0


def test_a_hint_never_depends_on_its_target_or_later_tokens():
    """The flip test: changing any token at or after position t changes no hint at positions <= t (the hint of
    target t reads tokens[:t] only, in stream order, across BOS)."""
    cfg = _cfg(ngram_tilt_order=3, ngram_tilt_threshold=0.5)
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, 3, (1500,), generator=g)
    toks[::97] = 1  # BOS markers: the context runs across them
    base = tg.ngram_hints(toks, cfg, CPU).hint
    for t in (3, 50, 400, 1000, 1499):
        flipped = toks.clone()
        flipped[t:] = torch.randint(0, 3, (toks.numel() - t,), generator=g)
        flipped[t] = (toks[t] + 1) % 3  # the target itself certainly changes
        assert torch.equal(tg.ngram_hints(flipped, cfg, CPU).hint[:t + 1], base[:t + 1]), t


def test_the_tilted_distribution_sums_to_one_and_its_nll_is_the_closed_form():
    """p'(v) = p(v) e^(b [v = h]) / Z over the whole vocabulary, Z = 1 + q (e^b - 1); the scored loss
    nll - b [y = h] + log Z is -log p'(y) for every target, the hinted one included."""
    torch.manual_seed(0)
    V, b = 50, 2.625
    z = tg.softcap(torch.randn(6, V) * 20, 30.0, 30.0)
    logp = torch.log_softmax(z, -1)
    h = torch.tensor([3, 3, 7, 0, 49, 10])
    tilted = logp + b * torch.nn.functional.one_hot(h, V)
    p_t = torch.softmax(tilted, -1)
    assert torch.allclose(p_t.sum(-1), torch.ones(6, dtype=p_t.dtype))
    hints = tg.NgramHints(torch.zeros(1, dtype=torch.long), 0, 0.0, b)
    for y in (h, torch.tensor([3, 4, 7, 1, 49, 9])):  # hinted and not
        nll = -logp.gather(1, y[:, None])[:, 0]
        got = hints.tilt(nll, logp.gather(1, h[:, None])[:, 0], y, h, torch.ones(6, dtype=torch.bool))
        assert torch.allclose(got, -torch.log(p_t.gather(1, y[:, None])[:, 0]), atol=1e-5)
    off = hints.tilt(nll, logp.gather(1, h[:, None])[:, 0], y, h, torch.zeros(6, dtype=torch.bool))
    assert torch.equal(off, nll)


def _small_model():
    cfg = _cfg(vocab_size=64, model_dim=32, num_heads=4, num_kv_heads=2, rope_dims=4, gate_window=8,
               caseops_enabled=0, bigram_vocab_size=0)
    torch.manual_seed(0)
    return cfg, tg.GPT(cfg)


def test_the_model_reads_the_hints_probability_from_its_own_logits():
    cfg, m = _small_model()
    with torch.no_grad():  # an untrained model has flat logits: give it some shape
        for p in m.parameters():
            p.add_(torch.randn_like(p.float()).to(p.dtype) * 0.05)
    x = torch.randint(0, 64, (2, 12))
    y, read = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
    nll, log_q = m(x, y, None, None, 0, read)
    assert torch.allclose(nll, m(x, y), atol=1e-6)
    assert torch.allclose(log_q, -m(x, read), atol=1e-5)  # log q(read) is minus the NLL of read as a target
    nll4, log_q4 = m(x, y, None, None, 4, read)
    assert torch.allclose(log_q4, log_q[:, -4:], atol=1e-5) and torch.allclose(nll4, nll[:, -4:], atol=1e-6)


def _val(tokens: torch.Tensor) -> tg.ValidationData:
    return tg.ValidationData(tokens, torch.ones_like(tokens, dtype=torch.int32), int((tokens == 1).sum()), 1)


def test_the_tilt_changes_only_the_scored_loss_and_helps_on_a_repetitive_stream():
    """On a stream of repeated phrases the hints are right and the tilted bpb is lower; the untilted figure is the
    model's own, equal to a run without the tilt; TTT's LoRA adapts on the untilted loss, so its weights after
    a batch do not depend on the tilt."""
    cfg, m = _small_model()
    cfg = tg.dataclasses.replace(cfg, eval_seq_len=32, ttt_chunk_size=8, ttt_batch_docs=2, ttt_lora_rank=4,
                                 ngram_tilt_order=4)
    phrase = torch.randint(2, 64, (20,), generator=torch.Generator().manual_seed(3))
    toks = torch.cat([torch.cat([torch.tensor([1]), phrase]) for _ in range(12)])
    val = _val(toks)
    hints = tg.ngram_hints(val.tokens, cfg, CPU)
    assert hints.fired > toks.numel() // 2
    plain = tg.eval_windows(m, val, 32, 32, 64, tg.Runtime.cpu())
    tilted = tg.eval_windows(m, val, 32, 32, 64, tg.Runtime.cpu(), hints=hints)
    assert tilted.tokens == plain.tokens and tilted.raw_nll == pytest.approx(plain.nll, rel=1e-6)
    assert tilted.bpb < plain.bpb - 0.5
    docs = tg.document_spans(val.tokens, 1)[:2]
    after = []
    for h in (None, hints):
        torch.manual_seed(0)
        lora, opt = tg.new_lora(cfg, tg.Runtime.cpu(), 0)
        m.requires_grad_(False)
        s = tg.ttt_score_batch(m, lora, opt, val, docs, cfg, tg.Runtime.cpu(), True, None, h)
        after.append(([p.detach().clone() for p in lora.parameters()], s))
    assert all(torch.equal(a, b) for a, b in zip(after[0][0], after[1][0]))
    assert after[1][1].nll < after[0][1].nll and after[1][1].raw_nll == pytest.approx(after[0][1].nll, rel=1e-6)


def test_the_pass_is_logged_before_scoring_and_every_rank_agrees(capsys):
    cfg = _cfg(ngram_tilt_order=3)
    toks = torch.tensor([1, 5, 6, 7, 5, 6, 7, 5, 6, 7, 1, 5, 6, 7])
    lines = []
    h = tg.shared_hints(_val(toks), cfg, tg.Runtime.cpu(), lines.append)
    assert lines[0].startswith(f"ngram_tilt_fired:{h.fired} targets:13 pass_s:")
    assert tg.shared_hints(_val(toks), _cfg(ngram_tilt=0), tg.Runtime.cpu(), lines.append) is None
    assert _cfg().ngram_tilt and (_cfg().ngram_tilt_order, _cfg().ngram_tilt_threshold,
                                  _cfg().ngram_tilt_boost) == (16, 0.8, 2.625)


def test_no_channel_reads_properties_of_the_target():
    """#1967/#2041's within-word and word-start channels were ruled illegal: there is no such option."""
    names = {n for n in tg.ENV_NAMES if n.startswith("NGRAM")}
    assert names == {"NGRAM_TILT", "NGRAM_TILT_ORDER", "NGRAM_TILT_THRESHOLD", "NGRAM_TILT_BOOST"}
    with pytest.raises(tg.ConfigError):
        tg.load_config({"NGRAM_TILT_WITHIN_WORD": "1"})
    assert math.isfinite(_cfg().ngram_tilt_boost)


def test_the_run_builds_hints_inside_the_eval_clock_before_the_plan(trained_tiny):
    """In a real run the pass is logged after the warm-up and before the plan, which lists it as spent; every
    scored mode says it used the tilt and gives the untilted figure beside it."""
    out = trained_tiny["stdout"].splitlines()
    at = lambda prefix: next(i for i, l in enumerate(out) if l.startswith(prefix))  # noqa: E731
    assert at("eval_warmup:") < at("ngram_tilt_fired:") < at("eval_plan:") < at("final_int6_roundtrip_exact")
    assert "ngram_tilt=" in out[at("eval_plan:")] and "(spent)" in out[at("eval_plan:")]
    for mode in ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact", "quantized_ttt_phased"):
        assert "ngram_tilt:1 untilted_val_bpb:" in out[at(mode)], out[at(mode)]
