"""The scorer's text part in ONNX Runtime: serve.quantize=onnx-int8, and the graphs benchmarks/bench_onnx.py times.

    export_text(lm, path)       the text logit (transformer + classification head, as HybridScorer.forward reads it)
                                as an fp32 ONNX graph: TorchScript exporter, opset 17, dynamic batch and sequence axes
    quantize_graph(src, out)    ORT dynamic int8 of a graph (int8 weights, activations quantised per batch)
    OrtText(graph, threads)     an ORT session behind `model.lm`'s call signature (CPUExecutionProvider)
    onnx_int8(model, dir, n)    the model with its text part as ORT int8: what serve.quantize=onnx-int8 serves

Only the text part moves: the collaborative part and the fusion stay in torch, and predict_probs runs as always (trim
padding, forward, sigmoid). Measured on the quality benchmark's rows (README, Benchmarks): ORT int8 1.87x torch fp32
against 1.41x for torch int8 (serve.quantize=int8), AUC change +0.0002.

onnx and onnxruntime are an optional extra (`pip install -e '.[onnx]'`), imported inside the functions.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from llmrec_ray.model import HybridScorer, unwrap
from llmrec_ray.text import TOKEN_KEYS

INSTALL_HINT = "pip install -e '.[onnx]'"


def require_onnx(what: str = "serve.quantize=onnx-int8"):
    """(onnx, onnxruntime), or an ImportError that names the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ImportError(f"{what} needs onnx and onnxruntime, which are not installed ({exc}); "
                          f"install them with `{INSTALL_HINT}`") from None
    return onnx, onnxruntime


class TextLogit(torch.nn.Module):
    """The text part as HybridScorer.forward uses it: tokens (B, T) int64 -> lm logit (B,) float32."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                       token_type_ids=token_type_ids).logits.squeeze(-1).float()


class OrtText(torch.nn.Module):
    """An ORT session standing in for `model.lm`: the same keyword inputs, returns an object with .logits (B, 1).
    `config`: the replaced model's Hugging Face config (HybridScorer.config reads it)."""

    def __init__(self, graph: str | Path, threads: int, config=None):
        super().__init__()
        _, ort = require_onnx()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = max(1, int(threads)), 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.graph, self.config = Path(graph), config
        self.session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])

    def forward(self, input_ids, attention_mask, token_type_ids):
        feeds = {k: v.to(torch.int64).numpy() for k, v in zip(TOKEN_KEYS, (input_ids, attention_mask, token_type_ids))}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(None, feeds)[0]).unsqueeze(-1))  # (B, 1)


def export_text(lm, path: str | Path) -> Path:
    """The text part of `lm` (a transformers model, LoRA merged if any) as an fp32 ONNX graph at `path`."""
    require_onnx("exporting the text part to ONNX")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lm = copy.deepcopy(unwrap(lm)).eval()  # a copy: the caller's model (and an item index reading it) is untouched
    # eager attention: SDPA exports as a pattern ORT's BERT optimizer cannot fuse (benchmarks/bench_onnx.py fuses it)
    lm.set_attn_implementation("eager")
    dummy = (torch.ones(2, 16, dtype=torch.long), torch.ones(2, 16, dtype=torch.long), torch.zeros(2, 16, dtype=torch.long))
    axes = {0: "batch", 1: "seq"}
    # dynamo=False: the TorchScript exporter, as measured; the torch.export one works too but ORT's BERT optimizer
    # does not fuse its graph
    with warnings.catch_warnings():
        # the tracer's notes on this model, checked by tests/test_onnx.py (rows of other lengths and batch sizes than
        # the dummy's): a padding length it records as a constant is 0 for every input, and its index ops see no
        # negative indices
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(TextLogit(lm), dummy, str(path), input_names=list(TOKEN_KEYS), output_names=["logit"],
                          dynamic_axes={**{k: axes for k in TOKEN_KEYS}, "logit": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    return path


def quantize_graph(src: str | Path, out: str | Path, weight_type: str = "QInt8") -> Path:
    """ORT dynamic int8 of graph `src` at `out`. weight_type: "QInt8" (served, measured fastest) or "QUInt8"."""
    onnx, _ = require_onnx("quantizing an ONNX graph")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # DefaultTensorType: shape inference cannot type the outputs of ORT's fused (com.microsoft) ops; harmless otherwise
    quantize_dynamic(Path(src), Path(out), weight_type=QuantType[weight_type],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return Path(out)


def with_ort_text(model: HybridScorer, graph: str | Path, threads: int) -> HybridScorer:
    """A scorer whose text part is `graph` in ORT (`threads` intra-op threads); the collaborative part is `model`'s
    own (shared, not copied) and the fusion weights the same. `model` itself is unchanged."""
    text = OrtText(graph, threads, config=model.lm.config)
    if not model.is_hybrid:
        return HybridScorer(text).eval()
    return HybridScorer(text, model.collab, model.vocab, model.fusion_weights()).eval()


def onnx_int8(model: HybridScorer, work_dir: str | Path, threads: int) -> HybridScorer:
    """`model` with its text part exported, quantised (QInt8 weights) and run in ORT with `threads` intra-op threads
    (seconds, at load). The graph lives in work_dir (the caller owns it and deletes it with the model); the fp32
    intermediate is removed."""
    require_onnx()  # before any work: the error names serve.quantize=onnx-int8 and the extra to install
    work_dir = Path(work_dir)
    fp32 = export_text(model.lm, work_dir / "text_fp32.onnx")
    int8 = quantize_graph(fp32, work_dir / "text_int8.onnx")
    fp32.unlink()
    return with_ort_text(model, int8, threads)
