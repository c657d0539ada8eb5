"""Model: causality and BOS-respecting mixing for every option, the application plan, the seeds' block parts,
the DeltaNet memory against a naive recurrence (the GPU kernels: test_gpu_paths.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

ALL_ON = {
    "VOCAB_SIZE": "97", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "NUM_FLAT_LAYERS": "3",
    "FLAT_ENCODER_LAYERS": "1", "NUM_CRAWLER_LAYERS": "2", "CRAWLER_LOOPS": "3", "CRAWLER_LOOP_ROPE_SCALES": "9,1,2",
    "INST_DIM": "8", "ROPE_DIMS": "4", "BIGRAM_VOCAB_SIZE": "31", "BIGRAM_DIM": "8", "GATE_WINDOW": "8",
    "PARALLEL_RESIDUAL_START": "4", "XSA_LAST_N": "4", "CRAWLER_MLP_MULT": "3", "VE_DIM": "8", "VE_LAYERS": "1,3",
    "DELTA_NET_HEADS": "2", "ASYM_LOGIT_RESCALE": "1", "TRAIN_SEQ_LEN": "16", "TRAIN_SEQ_SCHEDULE": "",
    "TRAIN_BATCH_TOKENS": "64", "CRAWLER_START_FRAC": "0",
}
VARIANTS = {
    "sparse_gate_window_smear_virtual": {},
    "dense_gate_channel_smear_flat": {"SPARSE_ATTN_GATE_ENABLED": "0", "GATED_ATTN_ENABLED": "1",
                                      "SMEAR_GATE": "channel", "UNET_SKIPS": "flat", "SKIP_GATES": "0"},
    "plain_gpt": {"USE_CRAWLER": "0", "NUM_LAYERS": "5", "INST_DIM": "0", "DELTA_NET_HEADS": "0", "VE_LAYERS": "1,3",
                  "PARALLEL_RESIDUAL_START": "3"},
}


def make_model(env: dict, seed: int = 0) -> tg.GPT:
    cfg, _ = tg.load_config(env)
    torch.manual_seed(seed)
    model = tg.GPT(cfg)
    with torch.no_grad():  # zero-initialised projections would hide most paths; randomise everything
        for name, p in model.named_parameters():
            if name != "softcaps":
                p.normal_(0, 0.3)
    return model.eval()


def docs_ids(T=24, bos_at=(0, 9), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 97, (2, T), generator=g)
    for t in bos_at:
        ids[:, t] = 1
    return ids


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_never_depend_on_later_tokens(variant):
    model = make_model(ALL_ON | VARIANTS[variant])
    ids = docs_ids()
    base = model.logits(ids)
    for t in range(ids.size(1) - 1):
        pert = ids.clone()
        pert[:, t + 1:] = torch.randint(2, 97, (2, ids.size(1) - t - 1))
        assert torch.equal(model.logits(pert)[:, :t + 1], base[:, :t + 1]), f"logits at <= {t} changed"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_document_masking_keeps_every_mixing_op_inside_the_document(variant):
    """A flip test across BOS: with document masking, changing anything in document 1 must not change a single
    logit of document 2 (attention, SmearGate, BigramHash, value embeddings and the DeltaNet memory alike)."""
    model = make_model(ALL_ON | VARIANTS[variant])
    ids = docs_ids(T=28, bos_at=(0, 11))
    seg = tg.make_segments(ids, 1, 16, torch.device("cpu"))
    base = model.logits(ids, seg)
    pert = ids.clone()
    pert[:, 1:11] = torch.randint(2, 97, (2, 10))
    out = model.logits(pert, tg.make_segments(pert, 1, 16, torch.device("cpu")))
    assert torch.equal(out[:, 11:], base[:, 11:]), "document 2 saw document 1"
    assert not torch.equal(out[:, :11], base[:, :11])


def test_segments_cut_long_documents_at_the_context_length():
    ids = torch.tensor([[5, 1, 7, 7, 7, 7, 7, 1, 9, 9]])
    starts = tg.segment_starts(ids.numpy(), 1, 3)
    assert starts[0].tolist() == [True, True, False, False, True, False, False, True, False, False]
    seg = tg.make_segments(ids, 1, 3, torch.device("cpu"))
    assert seg.cu.tolist() == [0, 1, 4, 7, 10]  # unpadded: its length is the graph's dynamic dimension


def test_application_plan_is_1855s_looped_topology():
    """Default = the crawler form of #1736/#1855: layers 3-5 three times, U-Net skips over the 17 applications."""
    cfg, _ = tg.load_config({})
    looped = tg.application_plan(cfg, 3)
    assert [a.block for a in looped] == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert [a.block for a in looped if a.push] == [0, 1, 2, 3, 4, 5, 3, 4]
    assert [a.pop for a in looped if not a.push] == [0, 1, 2, 3, 4, 5, 6, 7, -1]
    once = tg.application_plan(cfg, 1)
    assert [a.block for a in once if a.push] == [0, 1, 2, 3, 4] and [a.pop for a in once][5:] == [0, 1, 2, 3, 4, -1]
    assert tg.n_skip_weights(cfg) == 8
    flat = dataclasses_replace(cfg, unet_skips="flat")
    assert [a.pop for a in tg.application_plan(flat, 3)] == [-1] * 12 + [0, 1, 2, -1, -1]


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_parameter_count_independent_of_loops():
    base = ALL_ON | {"INST_DIM": "0", "CRAWLER_LOOP_ROPE_SCALES": "1,1,1,1,1", "UNET_SKIPS": "flat"}
    counts = {n: sum(p.numel() for p in tg.GPT(tg.load_config(base | {"CRAWLER_LOOPS": str(n)})[0]).parameters())
              for n in (1, 2, 5)}
    assert len(set(counts.values())) == 1, counts
    with_inst = [sum(p.numel() for p in tg.GPT(tg.load_config(base | {"CRAWLER_LOOPS": str(n), "INST_DIM": "8"})[0])
                     .parameters()) for n in (1, 2, 5)]
    assert with_inst[2] - with_inst[1] == 3 * 8 * 32  # one INST_DIM x MODEL_DIM up-projection per loop


def test_shared_block_gets_gradient_from_every_loop():
    model = make_model(ALL_ON).train()
    fc = model.blocks[1].mlp.fc  # crawler block 0
    contribs = []

    def hook(mod, inp, out):
        x = inp[0].detach()
        out.register_hook(lambda g: contribs.append(torch.einsum("bto,bti->oi", g, x)))

    h = fc.register_forward_hook(hook)
    ids = torch.randint(0, 97, (2, 16))
    model(ids[:, :-1], ids[:, 1:]).mean().backward()
    h.remove()
    assert len(contribs) == 3, "the shared block must run once per loop"
    assert all(c.norm() > 1e-6 for c in contribs)
    torch.testing.assert_close(sum(contribs), fc.weight.grad, rtol=1e-4, atol=1e-6)


def test_delayed_loop_activation_changes_depth_only():
    model = make_model(ALL_ON | {"CRAWLER_START_FRAC": "0.35"})
    assert model.active_loops == 1
    ids = torch.randint(0, 97, (1, 12))
    one = model.logits(ids)
    model.set_active_loops(3)
    assert not torch.allclose(one, model.logits(ids))


def test_block_parts_start_as_the_plain_block():
    """resid_mix starts at [1, 0], the lane lambdas at 1.1 / 1 (bf16-rounded, as #1855's bf16 cast leaves it:
    1.1015625), the skip gates at 0 (a 50/50 blend), the sparse gate at 0.5, SmearGate at zero strength: the seeds'
    initial functions (#1736, Ouroboros)."""
    cfg, _ = tg.load_config(ALL_ON)
    m = tg.GPT(cfg)
    blk = m.blocks[4]
    assert torch.equal(blk.resid_mix, torch.stack([torch.ones(32), torch.zeros(32)]))
    assert torch.equal(blk.lane_resid, torch.full((2,), 1.1015625)) and torch.equal(blk.lane_post, torch.ones(2, 2))
    assert torch.equal(m.skip_gates, torch.zeros_like(m.skip_weights))
    n = torch.randn(2, 5, 32)
    assert torch.allclose(blk.attn.gate(n), torch.full((2, 5, 4), 0.5))
    assert not m.smear.lam.detach().any() and not m.smear.weight.detach().any()
    dense, _ = tg.load_config(ALL_ON | {"SPARSE_ATTN_GATE_ENABLED": "0", "GATED_ATTN_ENABLED": "1"})
    g = tg.GPT(dense).blocks[0].attn.gate.weight
    assert g.shape == (4, 32) and 0.002 < float(g.detach().std()) < 0.01  # N(0, 0.005), #1736


def test_bigram_hash_learns_from_the_first_steps(plain_data):
    """Both BigramHash factors at zero would never receive a gradient; with the projection initialised (as in
    Ouroboros) all three parameters have non-zero gradients after one optimizer step on real text."""
    from conftest import TINY

    cfg, _ = tg.load_config(TINY | {"DATA_PATH": str(plain_data["data_path"])})
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    rt = tg.Runtime.cpu()
    opts = tg.build_optimizers(model, cfg, rt)
    loader = tg.TrainData(tg.shard_paths(cfg.data_path, "train"), cfg, rt, 1).loader(prefetch=0)
    tg.train_step(model, loader.next_batch(), opts, cfg, rt)
    (m,) = loader.next_batch()
    model(m.x, m.y, m.seg).mean().backward()
    for p in (model.bigram.embed.weight, model.bigram.proj.weight, model.bigram.scale):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_value_embedding_feeds_only_its_layers():
    model = make_model(ALL_ON)
    seen = {}
    for i, blk in enumerate(model.blocks):
        blk.attn.register_forward_pre_hook(lambda mod, args, i=i: seen.update({i: seen.get(i) or args[3] is not None}))
    model.logits(docs_ids())
    assert {i for i, v in seen.items() if v} == {1, 3}


def test_asymmetric_softcaps_are_frozen_in_training_and_used_in_the_forward():
    model = make_model(ALL_ON)
    cfg = model.cfg
    opts = tg.build_optimizers(model, cfg, tg.Runtime.cpu())
    assert not model.softcaps.requires_grad and all(p is not model.softcaps for p in opts.params)
    ids = docs_ids()
    base = model.logits(ids)
    with torch.no_grad():
        model.softcaps[1] = 5.0
    assert torch.equal(model.logits(ids).clamp_min(0), base.clamp_min(0)) and model.logits(ids).min() >= -5


def naive_delta_rule(q, k, v, beta, seg):
    B, H, T, D = k.shape
    out = torch.zeros_like(v)
    for b in range(B):
        for h in range(H):
            S = torch.zeros(D, v.size(-1))
            for t in range(T):
                if t and seg[b, t] != seg[b, t - 1]:
                    S = torch.zeros_like(S)
                u = beta[b, h, t] * (v[b, h, t] - S.T @ k[b, h, t])
                S = S + torch.outer(k[b, h, t], u)
                out[b, h, t] = S.T @ (q[b, h, t] * D ** -0.5)
    return out


@pytest.mark.parametrize("chunk", [4, 16, 64])
def test_delta_rule_chunked_equals_the_per_token_recurrence(chunk):
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 2, 45, 8
    q, k = (F.normalize(torch.randn(B, H, T, D, generator=g), dim=-1) for _ in range(2))
    v, beta = torch.randn(B, H, T, D, generator=g), torch.rand(B, H, T, generator=g)
    seg = torch.zeros(B, T, dtype=torch.long)
    seg[0, 10:], seg[0, 30:], seg[1, 5:] = 1, 2, 1
    torch.testing.assert_close(tg.delta_rule_chunked(q, k, v, beta, seg, chunk), naive_delta_rule(q, k, v, beta, seg),
                               rtol=1e-5, atol=1e-5)


def test_delta_memory_carries_the_previous_loop_causally():
    """Loop k reads loop k-1's writes at positions <= t only; the ClownCar_II form (the final state of the
    previous loop) would let position 0 see every later token."""
    model = make_model(ALL_ON)
    x = torch.randn(1, 20, 32)
    _, writes = model.delta(x, None, None)
    y = torch.randn(1, 20, 32)
    out, _ = model.delta(y, writes, None)
    x2 = x.clone()
    x2[:, 10:] = torch.randn(1, 10, 32)
    _, writes2 = model.delta(x2, None, None)
    out2, _ = model.delta(y, writes2, None)
    assert torch.equal(out[:, :10], out2[:, :10]) and not torch.equal(out[:, 10:], out2[:, 10:])


def test_xsa_placement_follows_its_scope():
    """XSA_SCOPE=crawler is the seeds' placement: XSA_LAST_N counts crawler blocks and no flat block gets XSA."""
    env = {"NUM_FLAT_LAYERS": "4", "FLAT_ENCODER_LAYERS": "2", "NUM_CRAWLER_LAYERS": "2", "CRAWLER_LOOPS": "2",
           "CRAWLER_LOOP_ROPE_SCALES": "1,1", "PARALLEL_RESIDUAL_START": "-1"}
    for extra, want in (({"XSA_SCOPE": "crawler", "XSA_LAST_N": "11"}, [0, 0, 1, 1, 0, 0]),
                        ({"XSA_SCOPE": "crawler", "XSA_LAST_N": "1"}, [0, 0, 0, 1, 0, 0]),
                        ({"XSA_SCOPE": "all", "XSA_LAST_N": "3"}, [0, 0, 0, 1, 1, 1])):
        cfg, _ = tg.load_config(env | extra)
        with torch.device("meta"):
            assert [int(b.attn.xsa) for b in tg.GPT(cfg).blocks] == want, extra


# ---- issue 18: the record's initialisation and precision, stated as rules ----

def _orthogonal(w: torch.Tensor) -> bool:
    """Rows (or columns, for a tall matrix) orthonormal up to bf16 rounding: singular values all 1."""
    sv = torch.linalg.svdvals(w.float())
    return bool(((sv - 1).abs() < 0.02).all())


@pytest.mark.parametrize("env", [{}, {"USE_CRAWLER": "0", "NUM_LAYERS": "11"}, {"DELTA_NET_HEADS": "4"}])
def test_init_is_1855s_orthogonal_inputs_zero_outputs_and_bf16_rounded(env):
    """#1855 (and every crawler seed): attention q/k/v and the MLP input orthogonal with gain 1, attention and MLP
    output projections zero, the tied embedding normal(0, 0.005); the model is cast to bf16 once, so every initial
    value is bf16-representable and the embedding table stays a bf16 master weight."""
    cfg, _ = tg.load_config({"VOCAB_SIZE": "512", "MODEL_DIM": "128", "NUM_HEADS": "4", "NUM_KV_HEADS": "2"} | env)
    torch.manual_seed(0)
    m = tg.GPT(cfg)
    for i, b in enumerate(m.blocks):
        for w in (b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight, b.mlp.fc.weight):
            assert _orthogonal(w), i
        assert not b.attn.proj.weight.any() and not b.mlp.proj.weight.any()
    # at width 128: c_q std 1/sqrt(128) = 0.088 (nn.Linear's default was 0.051), c_k/c_v 0.0625
    assert abs(m.blocks[0].attn.c_q.weight.std().item() - 128 ** -0.5) < 0.003
    assert m.tok_emb.weight.dtype == torch.bfloat16 and abs(m.tok_emb.weight.float().std().item() - 0.005) < 3e-4
    for name, p in m.named_parameters():
        assert p.dtype == (torch.bfloat16 if name == "tok_emb.weight" else torch.float32), name
        assert torch.equal(p.detach(), p.detach().bfloat16().to(p.dtype)), name
    if m.delta is not None:
        assert all(_orthogonal(w) for w in (m.delta.q_proj.weight, m.delta.k_proj.weight, m.delta.v_proj.weight))


def test_the_seeds_number_ln_scale_layers_flat_blocks_first():
    """LN_SCALE is 1/sqrt(layer + 1): #1855 numbers its 11 blocks in order (the looped 3-5 included); the crawler
    seeds number the F flat blocks 0..F-1 (encoder, then decoder) and the crawler block F."""
    base = {"NUM_FLAT_LAYERS": "4", "FLAT_ENCODER_LAYERS": "2", "NUM_CRAWLER_LAYERS": "1", "CRAWLER_LOOPS": "3",
            "CRAWLER_LOOP_ROPE_SCALES": "1,1,1", "PARALLEL_RESIDUAL_START": "-1", "MODEL_DIM": "64", "NUM_HEADS": "4",
            "NUM_KV_HEADS": "2", "ROPE_DIMS": "8"}
    scales = lambda env: [b.in_scale for b in tg.GPT(tg.load_config(env)[0]).blocks]  # noqa: E731
    # blocks in order: encoder 0, 1; crawler 2; decoder 3, 4
    assert scales(base) == pytest.approx([1, 2 ** -0.5, 3 ** -0.5, 4 ** -0.5, 5 ** -0.5])
    assert scales(base | {"LN_SCALE_ORDER": "flat_first"}) == pytest.approx(
        [1, 2 ** -0.5, 5 ** -0.5, 3 ** -0.5, 4 ** -0.5])
