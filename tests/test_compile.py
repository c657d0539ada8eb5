"""Compile readiness, checked on the CPU: training, evaluation and TTT trace with fullgraph=True (zero graph
breaks) and a bounded number of graphs; an attention kernel that cannot be traced is refused before any work."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import train_gpt as tg

pytestmark = pytest.mark.slow  # torch.compile on a CPU: about a minute for the module

CFG = {
    "VOCAB_SIZE": "97", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "NUM_FLAT_LAYERS": "3",
    "FLAT_ENCODER_LAYERS": "1", "NUM_CRAWLER_LAYERS": "1", "CRAWLER_LOOPS": "2", "ROPE_DIMS": "4", "GATE_WINDOW": "8",
    "PARALLEL_RESIDUAL_START": "3", "TRAIN_SEQ_LEN": "64", "TRAIN_SEQ_SCHEDULE": "32@0.5,64@1.0",
    "TRAIN_BATCH_TOKENS": "256", "CRAWLER_START_FRAC": "0.5", "BIGRAM_VOCAB_SIZE": "31", "BIGRAM_DIM": "8",
}


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.fixture()
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _rows(n, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, 97, (n, T + 1), generator=g)
    x[:, 0], x[:, T // 3] = 1, 1
    return x[:, :-1], x[:, 1:]


def test_train_step_and_eval_trace_whole_with_few_graphs(fresh_dynamo):
    cfg, _ = tg.load_config(CFG)
    model = tg.GPT(cfg)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    start = graphs()
    for loops, seq in ((1, 32), (1, 64), (2, 64)):  # every (depth, context) the schedule reaches
        model.set_active_loops(loops)
        x, y = _rows(4, 64)
        seg = tg.make_segments(x, 1, seq, torch.device("cpu"))
        compiled(x, y, seg).mean().backward()
    train_graphs = graphs() - start
    with torch.no_grad():
        for n, T in ((4, 64), (2, 64), (1, 37)):  # full eval batches, a short batch and the tail window
            x, y = _rows(n, T)
            compiled(x, y, tg.make_segments(x, 1, 64, torch.device("cpu")))
    eval_graphs = graphs() - start - train_graphs
    print(f"graphs: train {train_graphs} eval {eval_graphs}")
    assert train_graphs <= 2, "context stages must not recompile (segment ids keep the shapes fixed)"
    assert eval_graphs <= 3


def test_ttt_step_traces_with_dynamic_shapes(fresh_dynamo):
    # fewer flat blocks than the other tests: tracing symbolic shapes dominates this test's time
    cfg, _ = tg.load_config(CFG | {"CRAWLER_START_FRAC": "0", "NUM_FLAT_LAYERS": "2", "PARALLEL_RESIDUAL_START": "2"})
    model = tg.GPT(cfg).requires_grad_(False)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    lora, opt = tg.new_lora(dataclasses.replace(cfg, ttt_batch_docs=4, ttt_lora_rank=4), tg.Runtime.cpu(), 0)
    start = graphs()
    for rows, T in ((4, 16), (3, 32), (2, 48), (1, 64)):  # chunks of a batch: fewer active rows, wider windows
        x, y = _rows(rows, T)
        lora.rows = torch.arange(rows)
        compiled(x, y, None, lora).mean().backward()
        opt.step()
        opt.zero_grad()
    print(f"graphs: ttt {graphs() - start}")
    assert graphs() - start <= 2


def test_probe_tells_a_traceable_kernel_from_one_that_breaks_the_graph():
    def untraceable(q, k, v, causal=True):  # an FA3 build without torch custom ops behaves like this
        torch._dynamo.graph_break()
        return q

    for masked in (False, True):
        assert tg.probe_traceable(tg.AttentionBackend("fa3", untraceable, untraceable), torch.device("cpu"), masked)
        ok = tg.AttentionBackend("fa3", lambda q, k, v, causal=True: q * 1.0, lambda q, *a, **k: q * 1.0)
        assert tg.probe_traceable(ok, torch.device("cpu"), masked) is None


def test_choose_attention_falls_back_to_sdpa_with_a_warning(monkeypatch):
    cfg, _ = tg.load_config(CFG | {"DOC_MASKED_ATTN": "0", "TRAIN_SEQ_SCHEDULE": ""})

    def untraceable(q, k, v, causal=True):
        torch._dynamo.graph_break()
        return q

    monkeypatch.setattr(tg, "load_fa3", lambda: (untraceable, untraceable))
    notes = []
    backend = tg.choose_attention(cfg, torch.device("cpu"), True, notes, look_for_fa3=True)
    assert backend is tg.SDPA and notes and "does not trace" in notes[0] and "SDPA" in notes[0]
    monkeypatch.setattr(tg, "load_fa3", lambda: (lambda q, k, v, causal=True: q * 1.0,) * 2)
    assert tg.choose_attention(cfg, torch.device("cpu"), True, [], look_for_fa3=True).name == "fa3"
