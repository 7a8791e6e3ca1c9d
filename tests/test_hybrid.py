"""The hybrid scorer without Ray: forward / export / load round trip, id growth between rounds, fallback to
text for ids the tables never saw, and the collaborative part learning what popularity cannot."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from llmrec_ray.collab import (NUM_TEXT_FEATURES, CollabNet, batch_tensors, fit_collab, load_collab, predict_logits,
                               warm_start)
from llmrec_ray.ids import HIST_KEYS, ItemVocab, history_arrays
from llmrec_ray.config import load_config
from llmrec_ray.text import TOKEN_KEYS
from llmrec_ray.model import (HybridScorer, build_model, encode_inputs, fit_fusion, load_export, save_export,
                              score_frame)

CANDS = ["Toy Story (1995) | Animation", "Heat (1995) | Action", "A brand new film | Drama"]
HISTS = ["Jumanji (1995) rated 5", "no history", "Heat (1995) rated 1 ; Toy Story (1995) rated 5"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, ["model.backbone=tiny", "model.max_seq_len=24", "model.dropout=0.0", "model.collab.dim=4",
                              "model.collab.history_len=3"])


def _hybrid(cfg, ids=("1", "2", "3"), seed=0):
    lm, tokenizer = build_model(cfg.model)
    torch.manual_seed(seed)
    collab = CollabNet(len(ids), cfg.model.collab.dim)
    for p in collab.parameters():  # non-zero everywhere but the unknown row, so every term shows in the score
        torch.nn.init.normal_(p, std=0.5)
    for table in (collab.cand, collab.hist_liked, collab.hist_disliked, collab.item_bias):
        with torch.no_grad():
            table.weight[0].zero_()
    return HybridScorer(lm, collab, ItemVocab(ids), [0.7, 0.3, -0.2, 0.1]).eval(), tokenizer


def _frame(item_ids, history_ids):
    return pd.DataFrame({"candidate_text": CANDS, "history_text": HISTS, "item_id": item_ids,
                         "history_ids": history_ids, "history_ratings": [[5.0]] * 2 + [[1.0, 5.0]],
                         "history_labels": [[1.0]] * 2 + [[0.0, 1.0]]})


def test_hybrid_export_round_trip_and_the_text_part_loads_alone(cfg, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = _hybrid(cfg)
    frame = _frame(["1", "2", "9"], [["2"], [], ["2", "1"]])
    before = score_frame(model, tokenizer, cfg, frame)
    save_export(model, tokenizer, cfg, tmp_path / "m")
    loaded, tok2, cfg2 = load_export(tmp_path / "m")
    assert loaded.is_hybrid and cfg2 == cfg and loaded.vocab.ids == ["1", "2", "3"]
    np.testing.assert_allclose(score_frame(loaded, tok2, cfg2, frame), before, atol=1e-6)
    # stock transformers loads the text part alone and gives the text part's logits
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", local_files_only=True).eval()
    enc = encode_inputs(tok2, None, cfg2, CANDS, HISTS)
    with torch.no_grad():
        theirs = plain(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.squeeze(-1)
        ours = loaded.lm(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours)


def test_unknown_candidate_and_history_items_fall_back_to_text(cfg):
    model, tokenizer = _hybrid(cfg)
    # an unknown candidate: no item term, only the text (lm) terms and the history's features
    a = score_frame(model, tokenizer, cfg, _frame(["x", "y", "z"], [["2"], [], ["2", "1"]]))
    b = score_frame(model, tokenizer, cfg, _frame(["1", "2", "3"], [["2"], [], ["2", "1"]]))
    assert not np.allclose(a, b)  # the tables speak for known candidates
    enc = encode_inputs(tokenizer, model.vocab, cfg, CANDS, HISTS, ["x", "y", "z"], [["q"], [], ["r", "s"]],
                        [[5.0], [], [1.0, 5.0]], [[1.0], [], [0.0, 1.0]])
    assert (enc["cand_rows"] == 0).all() and (enc["hist_rows"] == 0).all()
    assert enc["hist_present"].sum() == 3  # unknown history items still count (n, like rate, ratings)
    with torch.no_grad():
        t = {k: torch.from_numpy(v) for k, v in enc.items()}
        lm = model.lm(input_ids=t["input_ids"], attention_mask=t["attention_mask"], token_type_ids=t["token_type_ids"]).logits.squeeze(-1)
        w = model.fusion_weights()
        _, f = model.collab.user_side(t["hist_rows"], t["hist_present"], t["hist_liked"], t["hist_rating"], t["hist_rated"])
        f = torch.cat([f, torch.zeros(len(f), 5)], dim=-1)  # an unknown candidate: no neighbours, no training count
        expected = (model.collab.mu + model.collab.user_features(f).squeeze(-1)
                    + (w[0] + w[1]) * lm + w[2] + w[3])
        torch.testing.assert_close(model(**t), expected)


def test_fit_fusion_weighs_the_text_by_how_much_it_knows_beside_the_tables():
    # synthetic held-out rows: the text logit is a noisy view of what decides the label, for every item; the tables
    # know it exactly for the items they saw and nothing for the others -- the text must count only for the latter
    g = torch.Generator().manual_seed(0)
    n = 4000
    unknown = (torch.rand(n, generator=g) < 0.3).float()
    signal = torch.randn(n, generator=g)
    labels = (torch.rand(n, generator=g) < torch.sigmoid(2 * signal)).float()
    lm_logit = signal + torch.randn(n, generator=g)
    cf = torch.where(unknown == 1, torch.zeros(n), 2 * signal)
    w = fit_fusion(lm_logit, cf, torch.zeros(n), unknown, labels)
    assert abs(w[0]) < 0.15, w  # known items: the tables already say it all
    assert w[0] + w[1] > 0.5, w  # unknown items: the text carries them
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    fused = cf + w[0] * lm_logit + w[1] * lm_logit * unknown + w[2] * unknown + w[3]
    assert bce(fused, labels) < bce(cf, labels) - 0.02  # better than the tables alone on these rows


def test_fit_fusion_leaves_the_known_items_calibration_to_the_tables():
    # held-out rows whose base rate sits far above what the tables say (a small round's noise, or a drifting week),
    # and items without events truly one logit worse than known ones: the written bias moves known items' mean logit
    # by nothing, and the round's offset does not leak into the unknown-item weight either (it did when the bias was
    # tied inside the fit: the weight that new items read swung with each round's base rate)
    g = torch.Generator().manual_seed(2)
    n = 4000
    unknown = (torch.rand(n, generator=g) < 0.25).float()
    signal = torch.randn(n, generator=g)
    labels = (torch.rand(n, generator=g) < torch.sigmoid(2 * signal + 1.5 - unknown)).float()
    lm_logit = signal + 0.7 + torch.randn(n, generator=g)  # a text logit with a mean of its own
    cf = torch.where(unknown == 1, torch.zeros(n), signal)  # the tables know half of it: the text adds the rest
    w = fit_fusion(lm_logit, cf, torch.zeros(n), unknown, labels, strength=0.0)
    known = unknown == 0
    shift = (w[0] * lm_logit + w[3])[known].mean()
    assert abs(float(shift)) < 1e-6, (w, shift)
    assert abs(w[0]) > 0.05, w  # the text term is used, so the tie is what keeps the shift at zero
    against_known = w[2] + w[1] * float(lm_logit[~known].mean())  # unknown vs known rows at their mean text logit
    # the rows' own -1 (pulled towards 0 by the known rows' twins), not the round's +1.5 on top of it (+0.89 with the
    # bias tied inside the fit)
    assert -1.5 < against_known < 0.0, w


def test_fit_fusion_moves_from_the_prior_as_far_as_the_rows_carry_it():
    g = torch.Generator().manual_seed(1)
    prior = [0.5, 0.2, -0.3, 0.0]

    def fit(n, strength):
        lm_logit = torch.randn(n, generator=g)
        labels = (torch.rand(n, generator=g) < torch.sigmoid(2 * lm_logit)).float()  # the data say w_lm ~ 2
        return fit_fusion(lm_logit, torch.zeros(n), torch.zeros(n), torch.zeros(n), labels, prior=prior, strength=strength)

    few, free, many = fit(60, 5.0), fit(60, 0.0), fit(20_000, 5.0)
    assert abs(few[0] - prior[0]) < abs(free[0] - prior[0]) - 0.2, (few, free)  # 60 rows: held near the prior
    assert abs(many[0] - 2.0) < 0.15, many  # 20,000 rows: the data decide


def test_text_only_gives_the_text_parts_own_logit_and_the_fused_one_adds_the_tables(cfg):
    lm, tokenizer = build_model(cfg.model)
    model = HybridScorer(lm, CollabNet(2, 4), ItemVocab(["a", "b"]), [0.5, 0.25, -0.75, 1.0]).eval()
    model.collab.item_logcount[1:] = 1.0  # as a fit leaves it: both items had events (else they count as unknown)
    enc = encode_inputs(tokenizer, model.vocab, cfg, ["x", "y", "z"], ["h", "h", "h"], item_ids=["a", "b", "new"],
                        history_ids=[[], ["a"], []], history_ratings=[[], [5.0], []])
    enc = {k: torch.as_tensor(v) for k, v in enc.items()}
    with torch.no_grad():
        text = model(**enc, text_only=True)
        cf = model.collab(enc["cand_rows"], **{k: enc[k] for k in HIST_KEYS})
        torch.testing.assert_close(text, model.lm(**{k: enc[k] for k in TOKEN_KEYS}).logits.squeeze(-1))
        unknown = torch.tensor([0.0, 0.0, 1.0])
        torch.testing.assert_close(model(**enc), cf + 0.5 * text + 0.25 * text * unknown - 0.75 * unknown + 1.0)
        lm_logit, cf_part, unknown_part = model.parts(**enc)
        torch.testing.assert_close((lm_logit, cf_part, unknown_part), (text, cf, unknown))


def test_ids_grow_between_rounds_old_rows_unchanged(cfg):
    net, vocab = warm_start(None, ["b", "a", "a"], dim=4, neighbours=2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net.nbr_rows[1:] = torch.tensor([[2, 0], [1, 0]])
        net.nbr_sims[1:] = torch.tensor([[0.5, 0.0], [0.5, 0.0]])
    grown, vocab2 = warm_start((net, vocab), ["c", "a", "d"], dim=4, neighbours=2)
    torch.testing.assert_close(grown.nbr_rows[:3], net.nbr_rows)  # rows keep their neighbour lists until the next fit
    assert (grown.nbr_rows[3:] == 0).all() and (grown.nbr_sims[3:] == 0).all()
    assert vocab2.ids == ["a", "b", "c", "d"] and vocab2.rows(["a", "b"]).tolist() == vocab.rows(["a", "b"]).tolist()
    for name in ("cand", "hist_liked", "hist_disliked", "item_bias"):
        old, new = getattr(net, name).weight, getattr(grown, name).weight
        torch.testing.assert_close(new[:3], old)  # rows 0..2: unknown, a, b
        assert (new[3:] == 0).all()  # c, d start at zero
    torch.testing.assert_close(grown.user_features.weight, net.user_features.weight)


def test_collab_learns_taste_from_history_that_popularity_cannot(tmp_path):
    # two tastes: users who liked item A like item C and dislike D, and the other way round. Every item is
    # liked half of the time, so popularity is at chance; the history-read user side must find the taste.
    rng = np.random.default_rng(0)
    cands, hist_ids, hist_r, labels = [], [], [], []
    for _ in range(4000):
        taste = rng.integers(2)
        cand = rng.choice(["C", "D"])
        cands.append(cand)
        hist_ids.append(["A" if taste else "B"])
        hist_r.append([5.0])
        labels.append(float((cand == "C") == bool(taste)))
    vocab = ItemVocab(["A", "B", "C", "D"])
    hist = history_arrays(vocab, hist_ids, hist_r, [[np.nan]] * len(cands), 2, 4.0)
    net = CollabNet(len(vocab), 4)
    fit_collab(net, vocab.rows(cands), hist, np.array(labels), epochs=30, batch_size=256, lr=0.05)
    p = predict_logits(net, vocab.rows(cands), hist)
    from llmrec_ray.metrics import auc

    assert auc(labels, p) > 0.95
    from llmrec_ray.collab import save_collab

    save_collab(net, vocab, tmp_path)
    net2, vocab2 = load_collab(tmp_path)
    np.testing.assert_allclose(predict_logits(net2, vocab2.rows(cands), hist), p, atol=1e-6)


def test_the_epoch_choice_stops_at_the_first_epoch_that_does_not_improve(monkeypatch):
    # labels are noise: the held-out loss stops improving within a few of the 30 allowed epochs. The choice must
    # stop there (not run all 30) and refit on every row for the best count, which is the epoch before the stop.
    import llmrec_ray.collab as collab

    rng = np.random.default_rng(0)
    items = [f"i{k}" for k in range(20)]
    cands = list(rng.choice(items, 3000))
    hist = history_arrays(ItemVocab(items), [list(rng.choice(items, 3)) for _ in cands], [[4.0, 2.0, 5.0]] * len(cands),
                          [[np.nan] * 3] * len(cands), 3, 4.0)
    consumed, real_epochs = [], collab._epochs

    def counting(*args, **kwargs):
        consumed.append(0)
        for loss in real_epochs(*args, **kwargs):
            consumed[-1] += 1
            yield loss

    monkeypatch.setattr(collab, "_epochs", counting)
    net = CollabNet(len(items), 8)
    report = fit_collab(net, ItemVocab(items).rows(cands), hist, rng.integers(0, 2, len(cands)).astype(float), epochs=30,
                        batch_size=128, lr=0.05, val_fraction=0.2)
    assert len(consumed) == 2  # the choice, then the refit
    assert consumed[0] < 30 and report.epochs == consumed[0] - 1 and consumed[1] == report.epochs


def test_bad_hybrid_exports_are_refused(cfg, tmp_path):
    model, tokenizer = _hybrid(cfg)
    good = save_export(model, tokenizer, cfg, tmp_path / "good")
    (good / "fusion.json").write_text(json.dumps({"weights": [1.0]}))
    with pytest.raises(ValueError, match="fusion"):
        load_export(good)
    (good / "collab.safetensors").unlink()
    with pytest.raises(ValueError, match="missing.*collab.safetensors"):
        load_export(good)


def test_text_kind_exports_only_the_text_part(tmp_path):
    cfg = load_config(None, ["model.kind=text", "model.backbone=tiny", "model.max_seq_len=24"])
    lm, tokenizer = build_model(cfg.model)
    save_export(lm, tokenizer, cfg, tmp_path / "t")
    assert not (tmp_path / "t" / "collab.safetensors").exists()
    loaded, _, _ = load_export(tmp_path / "t")
    assert not loaded.is_hybrid


def test_padding_trimmed_to_the_longest_row_changes_no_score(cfg):
    from llmrec_ray.model import predict_probs, trim_padding

    model, tokenizer = _hybrid(cfg)
    enc = encode_inputs(tokenizer, model.vocab, cfg, CANDS[:2], ["a", "b"], ["1", "9"], [["2"], []], [[5.0], []])
    trimmed = trim_padding(enc)
    assert trimmed["input_ids"].shape[1] < enc["input_ids"].shape[1] == cfg.model.max_seq_len  # short rows: cut
    assert enc["hist_rows"].shape[1] == cfg.model.collab.history_len == 3
    assert all(trimmed[k].shape == (2, 1) for k in HIST_KEYS)  # the longest history: one item
    assert trim_padding({**enc, "hist_present": np.zeros_like(enc["hist_present"])})["hist_rows"].shape == (2, 1)
    with torch.inference_mode():
        full = torch.sigmoid(model(**{k: torch.from_numpy(v) for k, v in enc.items()})).numpy()
    np.testing.assert_allclose(predict_probs(model, enc), full, atol=1e-6)  # predict_probs trims


def test_int8_scores_agree_with_fp32_and_serve_loads_int8(cfg, tmp_path):
    """Tolerance stated: P(like) within 0.02 of fp32 on the tiny model (the quality benchmark's AUC change:
    benchmarks/bench_inference.py). Serve's load_version applies serve.quantize=int8."""
    from llmrec_ray.model import quantize_int8
    from llmrec_ray.serve.inference import load_version
    from llmrec_ray.store import Store

    model, tokenizer = _hybrid(cfg)
    frame = _frame(["1", "2", "9"], [["2"], [], ["2", "1"]])
    fp32 = score_frame(model, tokenizer, cfg, frame)
    save_export(model, tokenizer, cfg, tmp_path / "export")
    int8 = score_frame(quantize_int8(model), tokenizer, cfg, frame)
    assert np.abs(int8 - fp32).max() < 0.02
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.lm.modules())
    store = Store.from_config(load_config(None, [f"store.uri={tmp_path / 'store'}"]).store)
    store.upload_dir(tmp_path / "export", "registry/versions/v0001/model")
    served = load_version(store, "registry/versions/v0001/model", "v0001", tmp_path / "cache", quantize="int8")
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in served.model.lm.modules())
    np.testing.assert_allclose(score_frame(served.model, served.tokenizer, served.cfg, frame), int8, atol=1e-6)


def _brute_force_neighbours(users, rows, labels, num_items, k):
    """The documented similarity, written the slow obvious way."""
    import collections

    pairs = collections.defaultdict(list)
    for u, i, y in zip(users, rows, labels):
        pairs[(u, i)].append(y)
    value = {key: float(np.mean(v)) for key, v in pairs.items()}
    by_user = collections.defaultdict(dict)
    for (u, i), v in value.items():
        by_user[u][i] = v
    centred = {u: {i: v - np.mean(list(items.values())) for i, v in items.items()} for u, items in by_user.items()}
    vec = np.zeros((num_items + 1, len(centred)))
    has = np.zeros_like(vec)
    for col, u in enumerate(sorted(centred)):
        for i, v in centred[u].items():
            vec[i, col], has[i, col] = v, 1.0
    sims = np.zeros((num_items + 1, num_items + 1))
    for a in range(1, num_items + 1):
        for b in range(1, num_items + 1):
            if a != b:
                co = (has[a] * has[b]).sum()
                sims[a, b] = vec[a] @ vec[b] / (np.linalg.norm(vec[a]) * np.linalg.norm(vec[b]) + 1e-9) * co / (co + 25.0)
    return sims


def test_item_neighbours_are_the_documented_similarity():
    from llmrec_ray.collab import item_neighbours

    rng = np.random.default_rng(0)
    n, num_items, k = 600, 9, 3
    users = rng.choice([f"u{i}" for i in range(40)], n)
    rows = rng.integers(1, num_items + 1, n)
    labels = (rng.random(n) < 0.3 + 0.05 * rows).astype(float)  # items differ, so similarities are not all zero
    # a user who likes everything: centred labels of exactly zero (co-rated, but adds nothing to the products)
    users = np.concatenate([users, ["fan"] * num_items])
    rows = np.concatenate([rows, np.arange(1, num_items + 1)])
    labels = np.concatenate([labels, np.ones(num_items)])
    nbr_rows, nbr_sims = item_neighbours(users, rows, labels, num_items, k)
    sims = _brute_force_neighbours(users, rows, labels, num_items, k)
    assert nbr_rows.shape == (num_items + 1, k) and (nbr_rows[0] == 0).all() and (nbr_sims[0] == 0).all()
    for item in range(1, num_items + 1):
        assert item not in nbr_rows[item]  # never its own neighbour
        expected = np.sort(np.clip(sims[item], 0, None))[::-1][:k]
        np.testing.assert_allclose(nbr_sims[item], expected, atol=1e-5)
        for row, sim in zip(nbr_rows[item], nbr_sims[item]):
            if sim > 0:
                assert abs(sims[item, row] - sim) < 1e-5


def test_neighbour_terms_read_the_history_against_the_candidates_list():
    net = CollabNet(3, 4, neighbours=2)
    with torch.no_grad():
        net.nbr_rows[1] = torch.tensor([2, 3])  # item 1's neighbours: 2 (0.6) and 3 (0.2)
        net.nbr_sims[1] = torch.tensor([0.6, 0.2])
    vocab = ItemVocab(["a", "b", "c"])
    # history (newest first): b rated 5 (liked), c rated 1, an unknown item rated 3; the mean rating is 3
    hist = history_arrays(vocab, [["b", "c", "zz"], []], [[5.0, 1.0, 3.0], []], [[], []], 4, 4.0)
    t = {k: torch.from_numpy(v) for k, v in hist.as_dict().items()}
    g = net.neighbour_features(torch.tensor([1, 1]), t["hist_rows"], t["hist_present"], t["hist_liked"],
                               t["hist_rating"], t["hist_rated"])
    # centred ratings on the (r - 4) / 2 scale: b +1.0, c -1.0; score = (0.6 * 1 - 0.2 * 1) / (0.8 + 1e-3)
    torch.testing.assert_close(g[0], torch.tensor([0.4 / 0.801, 0.6, 0.2, 0.8 / 3]))
    torch.testing.assert_close(g[1], torch.zeros(4))  # no history: no neighbour evidence
    assert (net.neighbour_features(torch.tensor([0]), t["hist_rows"][:1], t["hist_present"][:1], t["hist_liked"][:1],
                                   t["hist_rating"][:1], t["hist_rated"][:1]) == 0).all()  # unknown candidate


def test_the_neighbour_lookup_finds_each_history_item_in_the_candidates_list():
    from llmrec_ray.collab import _list_lookup

    g = torch.Generator().manual_seed(0)
    num_items, k, b, h = 40, 6, 64, 12
    rows = torch.stack([torch.randperm(num_items, generator=g)[:k] + 1 for _ in range(b)])  # unsorted, unique
    rows[:, -2:] = 0  # unused slots: row 0, similarity 0
    sims = torch.rand(b, k, generator=g) * (rows > 0)
    hist = torch.randint(0, num_items + 1, (b, h), generator=g)
    brute = ((rows.unsqueeze(1) == hist.unsqueeze(-1)) * sims.unsqueeze(1)).sum(-1)  # every slot against every item
    found = _list_lookup(rows, sims, hist)
    assert int((found > 0).sum()) > b // 2  # the draw holds many hits (63), so the comparison says something
    torch.testing.assert_close(found, brute)
    assert _list_lookup(rows[:, :0], sims[:, :0], hist).eq(0).all()  # no list


def test_tables_saved_before_the_neighbour_terms_load_and_score_as_before(tmp_path):
    from safetensors.torch import load_file, save_file

    from llmrec_ray.collab import NUM_HISTORY_FEATURES, save_collab

    vocab = ItemVocab(["a", "b", "c"])
    net = CollabNet(len(vocab), 4)
    with torch.no_grad():
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.5)
        net.item_logcount.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))  # the count weight must stay the count's
    hist = history_arrays(vocab, [["b"], ["a", "c"], []], [[5.0], [1.0, 4.0], []], [[], [], []], 3, 4.0)
    before = predict_logits(net, vocab.rows(["a", "b", "c"]), hist)
    save_collab(net, vocab, tmp_path)
    state = load_file(str(tmp_path / "collab.safetensors"))  # rewrite it as the earlier format: 7 weights, no lists
    w = state["user_features.weight"]
    state = {k: v for k, v in state.items() if not k.startswith(("nbr_", "ease_"))}
    state["user_features.weight"] = torch.cat([w[:, :NUM_HISTORY_FEATURES], w[:, -1:]], 1).contiguous()
    save_file(state, str(tmp_path / "collab.safetensors"))
    meta = json.loads((tmp_path / "collab_vocab.json").read_text())
    del meta["neighbours"], meta["ease_items"]
    (tmp_path / "collab_vocab.json").write_text(json.dumps(meta))
    old, vocab2 = load_collab(tmp_path)
    assert old.neighbours == 0 and old.user_features.weight.shape[1] == w.shape[1] and old.ease_items == 0
    np.testing.assert_allclose(predict_logits(old, vocab2.rows(["a", "b", "c"]), hist), before, atol=1e-6)


def _lgb_params(**extra):
    return dict(objective="binary", learning_rate=0.1, num_leaves=7, min_data_in_leaf=5, use_missing=False,
                deterministic=True, force_row_wise=True, num_threads=1, seed=0, verbose=-1, **extra)


def test_tree_head_scores_like_lightgbm():
    import lightgbm as lgb

    from llmrec_ray.collab import TreeHead

    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=(3000, 5)), 1).astype(np.float32)  # rounded: many values sit on split thresholds
    y = ((x[:, 0] * x[:, 1] > 0.2) ^ (x[:, 2] > 1.0) ^ (rng.random(3000) < 0.1)).astype(float)
    booster = lgb.train(_lgb_params(), lgb.Dataset(x, y, params={"verbose": -1}), num_boost_round=30)
    head = TreeHead.from_lightgbm(booster.dump_model())
    assert head.feature.shape[0] == 30 and 1 < head.depth <= 6
    test = np.round(rng.normal(size=(500, 5)), 1).astype(np.float32)
    np.testing.assert_allclose(head(torch.from_numpy(test)).numpy(), booster.predict(test, raw_score=True), atol=1e-9)
    with pytest.raises(ValueError, match="expects 5 features"):
        head(torch.zeros(2, 4))


def _stream(n=3000, seed=0):
    """Rows in time order: items 0..19 with their own like rates, and item "new" only in the newest tenth."""
    rng = np.random.default_rng(seed)
    rates = np.linspace(0.1, 0.9, 20)
    users, cands, hist_ids, hist_r, labels = [], [], [], [], []
    last: dict = {}
    for i in range(n):
        u = int(rng.integers(100))
        item = "new" if i >= n * 0.9 and rng.random() < 0.3 else str(int(rng.integers(20)))
        like = float(rng.random() < (0.9 if item == "new" else rates[int(item)]))
        users.append(u), cands.append(item), labels.append(like)
        h = last.get(u, [])
        hist_ids.append([j for j, _ in h]), hist_r.append([r for _, r in h])
        last[u] = ([(item, 5.0 if like else 1.0)] + h)[:5]
    return users, cands, hist_ids, hist_r, np.array(labels)


def test_tree_head_learns_from_past_statistics_only_and_travels_with_the_tables(tmp_path):
    from llmrec_ray.collab import HEAD_FEATURES, batch_tensors, head_examples, save_collab

    users, cands, hist_ids, hist_r, labels = _stream()
    vocab = ItemVocab(sorted(set(cands)))
    hist = history_arrays(vocab, hist_ids, hist_r, [[] for _ in cands], 5, 4.0)
    rows = vocab.rows(cands)
    # leakage check: "new" first appears in the newest tenth; read against the older 90% it is an item never seen
    t = batch_tensors(rows, hist)
    k = int(len(labels) * 0.9)
    x = head_examples(CollabNet(len(vocab), 4, neighbours=5), t, torch.tensor(labels, dtype=torch.float32),
                      np.array(users), k, ease_items=30)
    new = rows[k:] == vocab.index["new"]
    assert new.any()
    assert (x[~new, HEAD_FEATURES.index("ease_score")] != 0).any()
    for name in ("item_logcount", "item_std", "ease_score", "ease_signed", "ease_liked_minus_disliked"):
        assert (x[new, HEAD_FEATURES.index(name)] == 0).all(), name
    # its like rate is the prior (the older rows' overall rate), not the 0.9 of its own rows
    np.testing.assert_allclose(x[new, HEAD_FEATURES.index("item_like_rate")], labels[:k].mean(), rtol=1e-5)
    assert (x[~new, HEAD_FEATURES.index("item_logcount")] > 0).all()

    net = CollabNet(len(vocab), 4, neighbours=5)
    report = fit_collab(net, rows, hist, labels, epochs=2, users=np.array(users), head_fraction=0.5, head_trees=20,
                        head_min_rows=500, ease_items=10)
    assert net.head is not None and report.head_rows == 1500
    assert net.ease_items == 10 and net.ease_rated.shape == (11, 11) and int((net.ease_pos > 0).sum()) == 10
    with torch.no_grad():
        linear = net.linear_logit(**{k: v for k, v in t.items()}).numpy()
    p = predict_logits(net, rows, hist)
    assert not np.allclose(p, linear)  # the head scores, not the linear sum
    wide = history_arrays(vocab, hist_ids, hist_r, [[] for _ in cands], 12, 4.0)  # 7 more padding columns
    np.testing.assert_allclose(predict_logits(net, rows, wide), p, atol=1e-6)  # why model.trim_padding may cut them
    from llmrec_ray.metrics import auc

    assert auc(labels, p) > 0.7  # the items' like rates, learned through the statistics
    save_collab(net, vocab, tmp_path)
    net2, vocab2 = load_collab(tmp_path)
    assert json.loads((tmp_path / "collab_vocab.json").read_text())["head_features"] == list(HEAD_FEATURES)
    np.testing.assert_allclose(predict_logits(net2, vocab2.rows(cands), hist), p, atol=1e-6)
    for name in ("ease_pos", "ease_rated", "ease_signed"):
        assert torch.equal(getattr(net2, name), getattr(net, name)), name
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "collab.safetensors"))
    tensors["head.feature"][0, 0] = len(HEAD_FEATURES)  # a split reading a feature that does not exist
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad.safetensors").rename(tmp_path / "bad" / "collab.safetensors")
    (tmp_path / "bad" / "collab_vocab.json").write_text((tmp_path / "collab_vocab.json").read_text())
    with pytest.raises(ValueError, match="cannot be loaded.*outside"):
        load_collab(tmp_path / "bad")
    grown, vocab3 = warm_start((net2, vocab2), ["brand-new"], 4, 5)  # a next round starts from it, head included
    np.testing.assert_allclose(predict_logits(grown, vocab3.rows(cands), hist), p, atol=1e-6)
    assert torch.equal(grown.ease_pos[: len(net.ease_pos)], net.ease_pos) and grown.ease_pos[-1] == 0  # new: none
    # too few rows for the head: none this round, the linear sum scores
    small = CollabNet(len(vocab), 4)
    assert fit_collab(small, rows[:400], type(hist)(*(a[:400] for a in hist.as_dict().values())), labels[:400],
                      epochs=1, head_fraction=0.5, head_min_rows=500).head_rows == 0
    assert small.head is None


def test_the_tree_head_survives_the_consolidated_state_dict_export(cfg, tmp_path):
    """ZeRO-3 exports go through save_export(state_dict=...), which rebuilds the tables in a CPU twin; the head is
    not in a state dict and must be carried over."""
    import lightgbm as lgb

    from llmrec_ray.collab import HEAD_FEATURES, TreeHead

    model, tokenizer = _hybrid(cfg)
    rng = np.random.default_rng(0)
    c = model.collab  # EASE matrices over all three items: the twin must be built with their size
    c.ease_items, c.ease_pos = 3, torch.arange(4)
    c.ease_rated, c.ease_signed = (torch.nn.functional.pad(torch.randn(3, 3), (1, 0, 1, 0)) for _ in range(2))
    x = rng.normal(size=(400, len(HEAD_FEATURES))).astype(np.float32)
    y = ((x[:, 1] > 0) ^ (x[:, HEAD_FEATURES.index("ease_score")] > 0)).astype(float)
    booster = lgb.train(_lgb_params(), lgb.Dataset(x, y, params={"verbose": -1}), 5)
    model.collab.head = TreeHead.from_lightgbm(booster.dump_model())
    frame = _frame(["1", "2", "9"], [["2"], [], ["2", "1"]])
    before = score_frame(model, tokenizer, cfg, frame)
    model.collab.head = None
    assert not np.allclose(score_frame(model, tokenizer, cfg, frame), before)  # the head changes the scores
    model.collab.head = TreeHead.from_lightgbm(booster.dump_model())
    save_export(model, tokenizer, cfg, tmp_path / "m", state_dict=model.state_dict())
    loaded, tok2, cfg2 = load_export(tmp_path / "m")
    assert loaded.collab.head is not None and torch.equal(loaded.collab.ease_rated, c.ease_rated)
    np.testing.assert_allclose(score_frame(loaded, tok2, cfg2, frame), before, atol=1e-6)


def _text_net():
    net = CollabNet(4, 4, text_dim=2)  # rows 1..4: a, b, c, d; d has no text vector
    net.set_text_vectors(np.array([1, 2, 3]), torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]))
    return net, ItemVocab(["a", "b", "c", "d"])


def test_text_terms_read_the_history_against_the_candidate_by_their_texts():
    from llmrec_ray.collab import HEAD_FEATURES, NUM_TEXT_FEATURES

    net, vocab = _text_net()
    # history (newest first): b rated 5 (liked), c rated 1, an unknown item rated 3; centred on the (r - 4) / 2 scale
    # (mean 3): b +1.0, c -1.0. Candidate a: s(a, b) = 0.6, s(a, c) = 0.
    hist = history_arrays(vocab, [["b", "c", "zz"]] * 4 + [[]], [[5.0, 1.0, 3.0]] * 4 + [[]], [[]] * 5, 4, 4.0)
    t = {k: torch.from_numpy(v) for k, v in hist.as_dict().items()}
    cands = torch.tensor([1, 2, 4, 0, 1])  # a, b, d (no vector), unknown, a with no history
    f = net.text_features(cands, **t)
    torch.testing.assert_close(f[0], torch.tensor([0.6 / 0.601, 0.6, 0.0, 0.6 / 3]))
    # b against itself (1.0, liked) and c (0.8, not liked): (1 - 0.8) / 1.8
    torch.testing.assert_close(f[1], torch.tensor([0.2 / 1.801, 1.0, 0.8, 1.8 / 3]))
    assert (f[2:] == 0).all()  # no vector, unknown candidate, no history: no text evidence
    x = net.head_features(cands, **t)
    assert x.shape[1] == len(HEAD_FEATURES)
    first = HEAD_FEATURES.index("text_score")
    torch.testing.assert_close(x[:, first:first + NUM_TEXT_FEATURES], f)
    assert (CollabNet(4, 4).text_features(cands, **t) == 0).all()  # text_dim 0: the terms are off


def test_text_vectors_come_from_the_frozen_backbone_once_per_item_and_travel_with_the_tables(cfg, tmp_path):
    from llmrec_ray.collab import save_collab
    from llmrec_ray.model import fill_text_vectors, text_vector_dim

    texts = {"toy": "Toy Story (1995) | Animation, Children's", "heat": "Heat (1995) | Action, Crime"}
    dim = text_vector_dim(cfg.model)
    assert dim == 384  # MiniLM's hidden size: the frozen pretrained encoder, also behind the tiny test backbone
    net, vocab = warm_start(None, ["toy", "heat", "toy"], 4, text_dim=dim)
    assert net.rows_without_text().tolist() == [1, 2] and fill_text_vectors(net, vocab, texts, cfg.model) == 2
    torch.testing.assert_close(net.item_text[1:].norm(dim=-1), torch.ones(2))
    assert net.rows_without_text().tolist() == [] and fill_text_vectors(net, vocab, texts, cfg.model) == 0
    more = {**texts, "toy2": "Toy Story 2 (1999) | Animation, Children's"}
    grown, vocab2 = warm_start((net, vocab), ["toy2"], 4, text_dim=dim)
    torch.testing.assert_close(grown.item_text[:3], net.item_text)  # known items keep theirs
    assert grown.rows_without_text().tolist() == [3] and fill_text_vectors(grown, vocab2, more, cfg.model) == 1
    toy, heat, toy2 = (grown.item_text[vocab2.index[i]] for i in ("toy", "heat", "toy2"))
    assert float(toy @ toy2) > float(toy @ heat) + 0.1  # the sequel reads closer than the thriller
    save_collab(grown, vocab2, tmp_path)
    loaded, _ = load_collab(tmp_path)
    assert loaded.text_dim == dim
    torch.testing.assert_close(loaded.item_text, grown.item_text)
    off = load_config(None, ["model.backbone=tiny", "model.collab.text_sims=false"])
    assert text_vector_dim(off.model) == 0


def test_catalogue_items_get_a_row_and_text_vector_before_their_first_event_and_count_as_unknown(cfg):
    """collab_tables: with text vectors on, every catalogue item gets a row and its vector; one without events has
    an unknown item's statistics (the prior like rate and mean rating, count 0), so the fusion treats it as unknown
    and its collaborative logit is the "no events yet" twin's, while its text still meets the history's."""
    from llmrec_ray.model import collab_tables

    rng = np.random.default_rng(0)
    titles = ["Toy Story (1995) | Animation", "Toy Story 2 (1999) | Animation", "Heat (1995) | Action, Crime",
              "Casino (1995) | Drama", "Babe (1995) | Children's", "Sequel (2000) | Animation"]
    texts = {f"i{k}": t for k, t in enumerate(titles)}
    seen_ids = [f"i{k}" for k in range(5)]  # i5 is in the catalogue only
    n = 3000
    cand = rng.choice(seen_ids, n)
    hist_ids = [list(rng.choice(seen_ids, 3)) for _ in range(n)]
    ratings = [list(rng.integers(1, 6, 3).astype(float)) for _ in range(n)]
    labels = rng.integers(0, 2, n)
    net, vocab, encoded = collab_tables(None, cand, texts, cfg.model)
    assert encoded == 6 and len(vocab) == 6 and net.rows_without_text().tolist() == []
    hist = history_arrays(vocab, hist_ids, ratings, [[] for _ in range(n)], 3, 4.0)
    fit_collab(net, vocab.rows(list(cand)), hist, labels, users=np.arange(n) % 50, epochs=2, head_fraction=0.5,
               head_trees=20, head_leaves=4)
    new, old = vocab.index["i5"], vocab.index["i0"]
    assert net.seen(torch.tensor([0, new, old])).tolist() == [False, False, True]
    assert float(net.item_mean[0]) == pytest.approx(float(net.global_rating))  # row 0: an item without events
    assert float(net.item_like_rate[0]) == pytest.approx(float(labels.mean()), abs=1e-6)
    for row in (0, new):
        assert float(net.item_mean[row]) == pytest.approx(float(net.item_mean[0]))
        assert float(net.item_like_rate[row]) == pytest.approx(float(net.item_like_rate[0]))
    t = batch_tensors(np.array([new, old, new]), history_arrays(vocab, [["i0", "i1"], ["i0", "i1"], []],
                                                                [[5.0, 5.0], [5.0, 5.0], []], [[], [], []], 3, 4.0))
    with torch.no_grad():
        as_is, twin = net(**t), net(**{**t, "stats_rows": torch.zeros(3, dtype=torch.long)})
        feats = net.head_features(**t)
    assert as_is[0] == twin[0] and as_is[1] != twin[1]  # the catalogue item is its own "no events yet" twin
    assert feats[0, -NUM_TEXT_FEATURES:].abs().sum() > 0 and feats[2, -NUM_TEXT_FEATURES:].abs().sum() == 0
    lm, tokenizer = build_model(cfg.model)
    enc = encode_inputs(tokenizer, vocab, cfg, ["a", "b", "c"], ["h", "h", "h"], item_ids=["i5", "i0", "nope"])
    with torch.no_grad():
        unknown = HybridScorer(lm, net, vocab).parts(**{k: torch.as_tensor(v) for k, v in enc.items()})[2]
    assert unknown.tolist() == [1.0, 0.0, 1.0]
    for off in ("text_sims", "catalog_rows"):
        cfg_off = load_config(None, ["model.backbone=tiny", f"model.collab.{off}=false"])
        assert len(collab_tables(None, cand, texts, cfg_off.model)[1]) == 5  # only the items with events


def test_a_catalogue_item_added_between_rounds_gets_the_row_a_round_would_give_it(cfg):
    """model.grow_catalog (what a Serve replica runs when the catalogue grows): tables fitted without a catalogue item,
    then grown by it, hold for it what a fit that had it in the catalogue holds -- an event-less item's statistics
    and its text vector -- so the tree head reads the same features for it; the served model is left unchanged."""
    from llmrec_ray.model import collab_tables, grow_catalog

    rng = np.random.default_rng(1)
    titles = ["Toy Story (1995) | Animation", "Toy Story 2 (1999) | Animation", "Heat (1995) | Action, Crime",
              "Casino (1995) | Drama", "Babe (1995) | Children's", "Toy Story 3 (2010) | Animation"]
    texts = {f"i{k}": t for k, t in enumerate(titles)}
    seen_ids = [f"i{k}" for k in range(5)]  # i5 joins the catalogue after the round
    n = 2000
    cand = rng.choice(seen_ids, n)
    hist_ids = [list(rng.choice(seen_ids, 3)) for _ in range(n)]
    ratings = [list(rng.integers(1, 6, 3).astype(float)) for _ in range(n)]
    labels = rng.integers(0, 2, n)

    def fit(catalogue):
        net, vocab, _ = collab_tables(None, cand, catalogue, cfg.model)
        hist = history_arrays(vocab, hist_ids, ratings, [[] for _ in range(n)], 3, 4.0)
        fit_collab(net, vocab.rows(list(cand)), hist, labels, users=np.arange(n) % 40, epochs=2, head_fraction=0.5,
                   head_trees=10, head_leaves=4)
        return net, vocab

    at_round, vocab_r = fit(texts)
    lm, _ = build_model(cfg.model)
    served = HybridScorer(lm, *fit({i: texts[i] for i in seen_ids}), [0.5, 0.1, -0.2, 0.3])
    assert "i5" not in served.vocab.index
    grown = grow_catalog(served, texts, cfg.model)
    assert grown.vocab.ids == [*served.vocab.ids, "i5"] and len(served.vocab) == 5  # the served one is unchanged
    assert grown.lm is served.lm and grown.fusion_weights() == pytest.approx(served.fusion_weights())
    new_r, new_g = vocab_r.index["i5"], grown.vocab.index["i5"]
    for name in ("item_mean", "item_like_rate", "item_std", "item_logcount", "item_rating", "nbr_rows", "item_text"):
        torch.testing.assert_close(getattr(grown.collab, name)[new_g], getattr(at_round, name)[new_r], msg=name)
    assert not bool(grown.collab.seen(torch.tensor([new_g])))  # unknown in the fusion, as at round time
    hist = [["i0", "i1", "i2"], ["i2", "i3"]]
    t_r = batch_tensors(np.array([new_r, new_r]), history_arrays(vocab_r, hist, [[5.0, 4.0, 1.0], [2.0, 5.0]], [[], []], 3, 4.0))
    t_g = batch_tensors(np.array([new_g, new_g]), history_arrays(grown.vocab, hist, [[5.0, 4.0, 1.0], [2.0, 5.0]], [[], []], 3, 4.0))
    with torch.no_grad():
        f_r, f_g = at_round.head_features(**t_r), grown.collab.head_features(**t_g)
        served_f = served.collab.head_features(**{**t_g, "cand_rows": torch.zeros(2, dtype=torch.long)})  # i5: unknown
    torch.testing.assert_close(f_g, f_r)
    assert f_g[:, -NUM_TEXT_FEATURES:].abs().sum() > 0 and (served_f[:, -NUM_TEXT_FEATURES:] == 0).all()
    assert grow_catalog(grown, texts, cfg.model) is None  # nothing left to add
    off = load_config(None, ["model.backbone=tiny", "model.collab.catalog_rows=false"])
    assert grow_catalog(served, texts, off.model) is None


def test_a_tree_head_from_before_the_text_terms_loads_and_scores_as_before(tmp_path):
    from safetensors.torch import load_file, save_file

    from llmrec_ray.collab import HEAD_FEATURES, NUM_TEXT_FEATURES, TreeHead, save_collab

    old_features = len(HEAD_FEATURES) - NUM_TEXT_FEATURES
    net, vocab = _text_net()
    # one tree on item_like_rate: what a head fitted before the text terms could read
    net.head = TreeHead(torch.tensor([[HEAD_FEATURES.index("item_like_rate"), 0, 0]]), torch.tensor([[0.5, 0.0, 0.0]]),
                        torch.tensor([[1, 1, 2]]), torch.tensor([[2, 1, 2]]),
                        torch.tensor([[0.0, -1.0, 1.0]], dtype=torch.float64), old_features)
    with torch.no_grad():
        net.item_like_rate[1:] = torch.tensor([0.2, 0.9, 0.4, 0.7])
    hist = history_arrays(vocab, [["b"]] * 4, [[5.0]] * 4, [[]] * 4, 4, 4.0)
    before = predict_logits(net, vocab.rows(["a", "b", "c", "d"]), hist)
    assert before.tolist() == [-1.0, 1.0, -1.0, 1.0]
    net.text_dim = 0
    save_collab(net, vocab, tmp_path)  # rewrite it as the earlier format: no text vectors, 16 head features
    state = {k: v for k, v in load_file(str(tmp_path / "collab.safetensors")).items() if k != "item_text"}
    save_file(state, str(tmp_path / "collab.safetensors"))
    meta = json.loads((tmp_path / "collab_vocab.json").read_text())
    del meta["text_dim"]
    meta["head_features"] = list(HEAD_FEATURES[:old_features])
    (tmp_path / "collab_vocab.json").write_text(json.dumps(meta))
    old, vocab2 = load_collab(tmp_path)
    assert old.text_dim == 0 and old.head.num_features == old_features
    np.testing.assert_allclose(predict_logits(old, vocab2.rows(["a", "b", "c", "d"]), hist), before)
    meta["head_features"] = list(reversed(HEAD_FEATURES[:old_features]))  # not what this code computes: refused
    (tmp_path / "collab_vocab.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="refit the tables"):
        load_collab(tmp_path)


def test_ease_weights_are_the_closed_form_over_the_items_with_most_users():
    from llmrec_ray.collab import ease_weights

    rng = np.random.default_rng(0)
    num_users, num_items, l2 = 40, 9, 5.0
    users = rng.integers(num_users, size=400)
    rows = np.minimum(rng.geometric(0.25, size=400), num_items)  # item 1 most frequent, then 2, ...
    labels = (rng.random(400) < 0.5).astype(float)
    count, liked = np.zeros((num_users, num_items + 1)), np.zeros((num_users, num_items + 1))
    np.add.at(count, (users, rows), 1.0)
    np.add.at(liked, (users, rows), labels)
    has = count > 0
    label = np.where(has, liked / np.maximum(count, 1), 0.0)  # a (user, item) pair's mean label
    centred = np.where(has, label - (label.sum(1) / has.sum(1))[:, None], 0.0)
    by_users = has.sum(0)

    def closed_form(x):
        p = np.linalg.inv(x.T @ x + l2 * np.eye(x.shape[1]))
        b = -p / np.diag(p)[None, :]
        np.fill_diagonal(b, 0.0)
        return b

    for cap in (num_items, 4):
        pos, rated, signed = ease_weights(users, rows, labels, num_items, cap, l2)
        kept = np.sort(np.argsort(-by_users[1:], kind="stable")[:cap] + 1)  # the cap items with most users
        assert sorted(np.nonzero(pos)[0]) == list(kept) and pos[0] == 0
        at = np.ix_(pos[kept], pos[kept])
        np.testing.assert_allclose(rated[at], closed_form(has[:, kept].astype(float)), atol=1e-5)
        np.testing.assert_allclose(signed[at], closed_form(centred[:, kept]), atol=1e-5)
        assert (rated[0] == 0).all() and (rated[:, 0] == 0).all() and rated.shape == (cap + 1, cap + 1)
    pos, rated, _ = ease_weights(users, rows, labels, num_items, 0, l2)  # off
    assert (pos == 0).all() and rated.shape == (1, 1)


def test_ease_terms_read_the_history_through_the_matrices():
    from llmrec_ray.collab import HEAD_FEATURES, NUM_EASE_FEATURES

    vocab = ItemVocab(["a", "b", "c", "d"])
    net = CollabNet(4, 4, ease_items=3)
    net.ease_pos = torch.tensor([0, 1, 2, 3, 0])  # a, b, c in the matrices; d not
    w = torch.zeros(4, 4)
    w[2, 1], w[3, 1], w[1, 2] = 0.5, -0.25, 2.0  # B[b, a], B[c, a], B[a, b]
    net.ease_rated, net.ease_signed = w, 2 * w
    # history (newest first): b rated 5 (liked), c rated 1, d rated 4 (liked; not in the matrices), unknown rated 3
    hist = history_arrays(vocab, [["b", "c", "d", "zz"]] * 3, [[5.0, 1.0, 4.0, 3.0]] * 3, [[]] * 3, 4, 4.0)
    t = {k: torch.from_numpy(v) for k, v in hist.as_dict().items()}
    f = net.ease_features(torch.tensor([1, 4, 0]), **t)  # a, d, unknown
    # on the (r - 4) / 2 scale the ratings are b 0.5, c -1.5, d 0, zz -0.5: the history's mean -0.375
    centred_b, centred_c = 0.5 + 0.375, -1.5 + 0.375
    torch.testing.assert_close(f[0], torch.tensor([0.25, 2 * (0.5 * centred_b - 0.25 * centred_c), 0.75]))
    assert (f[1:] == 0).all()  # candidates outside the matrices: no EASE evidence
    x = net.head_features(torch.tensor([1, 4, 0]), **t)
    torch.testing.assert_close(x[:, -NUM_EASE_FEATURES:], f)
    assert HEAD_FEATURES[-NUM_EASE_FEATURES:] == ("ease_score", "ease_signed", "ease_liked_minus_disliked")
    assert (CollabNet(4, 4).ease_features(torch.tensor([1, 2]), **{k: v[:2] for k, v in t.items()}) == 0).all()


def test_a_warm_started_round_fits_the_tables_in_model_collab_warm_epochs(tmp_path):
    # the second round starts from the first round's tables: model.collab.warm_epochs (1) passes over all history; a
    # fresh fit makes model.collab.epochs passes (here without the choice on the newest rows: val_fraction 0), and so
    # does a warm one with warm_epochs=0
    from llmrec_ray.datasets.synth import generate_synth
    from llmrec_ray.ledger import Ledger
    from llmrec_ray.store import Store
    from llmrec_ray.train import fit_round_collab

    small = ["synth.num_users=40", "synth.num_items=30", "synth.num_events=1600", "synth.num_periods=3",
             "model.backbone=tiny", "model.max_seq_len=24", "model.collab.history_len=5", "model.collab.epochs=4",
             "model.collab.val_fraction=0", f"store.uri={tmp_path / 'store'}"]
    cfg = load_config(None, small)
    store = Store.from_config(cfg.store)
    generate_synth(cfg, store, progress=False)
    ledger = Ledger(store)
    ledger.refresh()
    keys = [s.key for s in ledger.shards()]
    assert len(keys) == 3
    first = fit_round_collab(cfg, store, keys[:2], None, "r1")
    assert not first.report["collab_warm_start"] and first.report["collab_epochs"] == 4
    second = fit_round_collab(cfg, store, keys, first.uri, "r2")
    assert second.report["collab_warm_start"] and second.report["collab_epochs"] == 1
    third = fit_round_collab(load_config(None, [*small, "model.collab.warm_epochs=0"]), store, keys, first.uri, "r3")
    assert third.report["collab_warm_start"] and third.report["collab_epochs"] == 4
