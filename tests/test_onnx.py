"""serve.quantize=onnx-int8 without Ray: the text part of a tiny hybrid exported to ONNX computes what torch computes
(rows of varied lengths, padding trimmed, batches of 1 and several), its int8 version agrees within a stated
tolerance, Serve's load_version builds it and sends the warm-up and requests through the ORT session, and a missing
onnxruntime is a clear error.

Tolerances stated: the fp32 graph within 1e-5 of torch (measured ~1e-7): the export itself is exact. The int8 graph
within INT8_TOLERANCE of torch fp32 in P(like). Loose on purpose: on this random tiny BERT (weights std 0.2, so the
text logit varies by row) QInt8 weights x uint8 activations saturate in ORT's int8 kernels on AVX2 CPUs without
VNNI (measured 0.050-0.087 here; torch int8 0.01; reduce_range=True 0.005). On the trained MiniLM hybrid the same
path changes P(like) by at most 0.0029 and AUC by +0.0002 (README, Benchmarks: bench_onnx.py)."""

import sys

import numpy as np
import onnx
import pytest
import torch

from llmrec_ray.collab import CollabNet
from llmrec_ray.config import load_config
from llmrec_ray.ids import ItemVocab
from llmrec_ray.model import HybridScorer, build_model, encode_inputs, predict_probs, save_export
from llmrec_ray.onnx_text import OrtText, export_text, onnx_int8, with_ort_text
from llmrec_ray.serve.inference import encode_item, forward, load_version, warm_up
from llmrec_ray.serve.schemas import ScoreItem
from llmrec_ray.store import Store
from llmrec_ray.text import TOKEN_KEYS

INT8_TOLERANCE = 0.15  # max |P(like) change| against torch fp32 (module docstring: why this loose)
IDS = ["1", "2", "3"]
CANDS = ["Toy Story (1995) | Animation", "Heat (1995) | Action | Crime | Thriller",
         "A brand new film about a long journey across the mountains and the sea | Adventure | Drama", "Up",
         "Casino (1995) | Drama", "Twelve Monkeys (1995) | Sci-Fi"]
HISTS = ["Jumanji (1995) rated 5", "no history", "Heat (1995) rated 1 ; Toy Story (1995) rated 5 ; Casino (1995) rated 4",
         "x", "Up rated 3", "Twelve Monkeys (1995) rated 2 ; Heat (1995) rated 5"]
CAND_IDS = ["1", "2", None, "9", "3", "1"]  # known, unknown (9) and free text (None)
HIST_IDS = [["2"], [], ["2", "1", "3"], ["7"], ["3"], ["1", "2"]]
HIST_RATINGS = [[5.0], [], [1.0, 5.0, 4.0], [3.0], [3.0], [2.0, 5.0]]


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, ["model.backbone=tiny", "model.max_seq_len=64", "model.dropout=0.0", "model.collab.dim=4",
                              "model.collab.history_len=3"])


@pytest.fixture(scope="module")
def hybrid(cfg):
    """(model, tokenizer): a tiny hybrid whose text logit varies by row (the default init's is ~constant)."""
    lm, tokenizer = build_model(cfg.model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 2:  # embeddings and Linear weights
                p.normal_(std=0.2)
    collab = CollabNet(len(IDS), cfg.model.collab.dim)
    for p in collab.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return HybridScorer(lm, collab, ItemVocab(IDS), [0.7, 0.3, -0.2, 0.1]).eval(), tokenizer


@pytest.fixture(scope="module")
def served_int8(hybrid, tmp_path_factory):
    model, _ = hybrid
    return onnx_int8(model, tmp_path_factory.mktemp("onnx"), threads=1)


@pytest.fixture(scope="module")
def served_fp32(hybrid, tmp_path_factory):
    model, _ = hybrid
    return with_ort_text(model, export_text(model.lm, tmp_path_factory.mktemp("onnx") / "text_fp32.onnx"), threads=1)


def _batches(cfg, tokenizer, batch_size: int) -> list[dict]:
    enc = encode_inputs(tokenizer, ItemVocab(IDS), cfg, CANDS, HISTS, CAND_IDS, HIST_IDS, HIST_RATINGS)
    lengths = enc["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 3 and lengths.max() < cfg.model.max_seq_len  # varied rows, padding trimmed
    return [{k: v[i:i + batch_size] for k, v in enc.items()} for i in range(0, len(CANDS), batch_size)]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_onnx_fp32_graph_computes_the_torch_text_part(cfg, hybrid, served_fp32, batch_size):
    model, tokenizer = hybrid
    batches = _batches(cfg, tokenizer, batch_size)
    with torch.inference_mode():
        text = np.concatenate([model.lm(**{k: torch.from_numpy(b[k]) for k in TOKEN_KEYS}).logits.numpy() for b in batches])
    assert np.ptp(text) > 0.2  # the text logit varies by row: a graph that ignored its inputs would fail
    fp32 = np.concatenate([predict_probs(model, b) for b in batches])
    np.testing.assert_allclose(np.concatenate([predict_probs(served_fp32, b) for b in batches]), fp32, atol=1e-5)
    assert isinstance(served_fp32.lm, OrtText) and served_fp32.collab is model.collab


@pytest.mark.parametrize("batch_size", [1, 4])
def test_onnx_int8_probs_agree_with_fp32(cfg, hybrid, served_int8, batch_size):
    model, tokenizer = hybrid
    batches = _batches(cfg, tokenizer, batch_size)
    fp32 = np.concatenate([predict_probs(model, b) for b in batches])
    int8 = np.concatenate([predict_probs(served_int8, b) for b in batches])
    assert np.abs(int8 - fp32).max() < INT8_TOLERANCE


def test_the_graph_is_int8(served_int8):
    graph = onnx.load(str(served_int8.lm.graph))
    ops = {n.op_type for n in graph.graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in graph.graph.initializer) >= 12  # 2 layers x 6 Linear


def test_load_version_serves_onnx_int8_through_the_ort_session(cfg, hybrid, served_int8, tmp_path, monkeypatch):
    model, tokenizer = hybrid
    save_export(model, tokenizer, cfg, tmp_path / "export")
    store = Store.from_config(load_config(None, [f"store.uri={tmp_path / 'store'}"]).store)
    store.upload_dir(tmp_path / "export", "registry/versions/v0001/model")
    state = load_version(store, "registry/versions/v0001/model", "v0001", tmp_path / "cache", quantize="onnx-int8")
    assert isinstance(state.model.lm, OrtText)
    assert (tmp_path / "cache" / "v0001" / "onnx" / "text_int8.onnx").is_file()
    calls = []
    session, run = state.model.lm.session, state.model.lm.session.run
    monkeypatch.setattr(session, "run", lambda *a, **kw: calls.append(len(a[1]["input_ids"])) or run(*a, **kw))
    warm_up(state)
    assert len(calls) == 1
    item = ScoreItem(CANDS, HISTS[2], CAND_IDS, HIST_IDS[2], HIST_RATINGS[2])
    probs = np.array(forward(state, [encode_item(state, item)])[0])
    assert calls[1:] == [len(CANDS)]
    enc = encode_inputs(tokenizer, ItemVocab(IDS), cfg, CANDS, [HISTS[2]] * len(CANDS), CAND_IDS,
                        [HIST_IDS[2]] * len(CANDS), [HIST_RATINGS[2]] * len(CANDS))
    assert np.abs(probs - predict_probs(model, enc)).max() < INT8_TOLERANCE
    np.testing.assert_allclose(probs, predict_probs(served_int8, enc), atol=1e-5)  # the same graph as onnx_int8's


def test_missing_onnxruntime_is_a_clear_error(cfg, hybrid, tmp_path, monkeypatch):
    model, tokenizer = hybrid
    save_export(model, tokenizer, cfg, tmp_path / "export")
    store = Store.from_config(load_config(None, [f"store.uri={tmp_path / 'store'}"]).store)
    store.upload_dir(tmp_path / "export", "m")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(ImportError, match=r"onnx-int8 needs onnx and onnxruntime.*pip install -e '\.\[onnx\]'"):
        load_version(store, "m", "v0001", tmp_path / "cache", quantize="onnx-int8")
