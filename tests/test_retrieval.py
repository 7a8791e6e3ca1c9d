"""The retrieval stage without Ray: an index built from a tiny hybrid export ranks exactly as the collaborative part,
items the tables never saw are indexed from their text (at build time and after it), pools and exclusions hold,
and a saved index refuses another version or model."""

import numpy as np
import pytest
import torch

from llmrec_ray.collab import CollabNet, predict_logits
from llmrec_ray.config import load_config
from llmrec_ray.ids import ItemVocab, history_arrays
from llmrec_ray.item_index import INDEX_FILE, TextEncoder, TextProjection, build_index, load_index, save_index
from llmrec_ray.model import HybridScorer, build_model, load_export, save_export
from llmrec_ray.retrieval import ItemIndex, user_vectors

KNOWN = [str(i) for i in range(1, 11)]  # ids the tables know
GENRES = ["Action", "Comedy", "Drama"]
CATALOG = KNOWN + ["n1", "n2"]  # + two new catalogue items: vectors from text
TEXTS = {i: f"Film number {i} ({1990 + k}) | {GENRES[k % 3]}" for k, i in enumerate(CATALOG)}
HISTORY = (["3", "7", "n1", "x"], [5.0, 1.0, 4.0, None], [])  # ids newest first, ratings, labels (derived)


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, ["model.backbone=tiny", "model.max_seq_len=24", "model.dropout=0.0", "model.collab.dim=4",
                              "model.collab.history_len=5"])


def _hybrid(cfg, seed=0):
    lm, tokenizer = build_model(cfg.model)
    torch.manual_seed(seed)
    collab = CollabNet(len(KNOWN), cfg.model.collab.dim)
    for p in collab.parameters():  # non-zero everywhere but the unknown row, so every term shows in the score
        torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        for table in (collab.cand, collab.hist_liked, collab.hist_disliked, collab.item_bias):
            table.weight[0].zero_()
        collab.item_logcount.copy_(torch.rand(len(KNOWN) + 1) * 5)  # the count term is part of the item vector
        collab.item_rating.copy_(torch.randn(len(KNOWN) + 1))
        collab.item_logcount[0] = collab.item_rating[0] = 0.0
    return HybridScorer(lm, collab, ItemVocab(KNOWN), [0.7, 0.3, -0.2, 0.1]).eval(), tokenizer


@pytest.fixture(scope="module")
def export(cfg, tmp_path_factory):
    """(model, tokenizer, cfg) loaded back from a saved tiny hybrid export."""
    model, tokenizer = _hybrid(cfg)
    out = save_export(model, tokenizer, cfg, tmp_path_factory.mktemp("export") / "m")
    return load_export(out)


@pytest.fixture()
def index(export):
    model, tokenizer, cfg = export
    return build_index(model, tokenizer, cfg, CATALOG, [TEXTS[i] for i in CATALOG],
                       [GENRES[k % 3] for k in range(len(CATALOG))], version="v0001")


def _brute_force(vectors, q, n, allowed=None, exclude=()):
    scores = vectors @ q
    rows = [r for r in np.argsort(-scores, kind="stable") if (allowed is None or r in allowed) and r not in exclude]
    return rows[:n]


def test_index_ranks_known_items_exactly_as_the_collaborative_logits(export, index):
    model, _, cfg = export
    uv = user_vectors(model, cfg, [HISTORY[0]], [HISTORY[1]], [HISTORY[2]])
    assert uv.shape == (1, cfg.model.collab.dim + 1) and uv[0, -1] == 1.0
    hist = history_arrays(model.vocab, [HISTORY[0]] * len(KNOWN), [[5.0, 1.0, 4.0, np.nan]] * len(KNOWN),
                          [[]] * len(KNOWN), cfg.model.collab.history_len, cfg.data.like_threshold)
    logits = predict_logits(model.collab, model.vocab.rows(KNOWN), hist)
    got = index.top_n(uv, n=len(KNOWN), allowed=index.rows(KNOWN))[0]
    assert got.item_ids == [KNOWN[i] for i in np.argsort(-logits)]
    # the scores are the logits less one per-user constant: the ranking is the collaborative part's, exactly
    by_id = dict(zip(got.item_ids, got.scores))
    gap = logits - np.array([by_id[i] for i in KNOWN])
    np.testing.assert_allclose(gap, gap[0], atol=1e-5)
    assert not index.from_text[index.rows(KNOWN)].any() and index.from_text[index.rows(["n1", "n2"])].all()


def test_new_items_get_vectors_from_text_at_build_and_after_it(export, index):
    model, tokenizer, cfg = export
    text = "A brand new film (2024) | Comedy"
    assert index.add_items(["new", "3", "new"], [text, "ignored", text], ["Comedy", "Drama", "Comedy"]) == ["new"]
    assert len(index) == len(CATALOG) + 1 and index.from_text[index.rows(["new"])].all()
    # the same vector as if the item had been in the catalogue at build time (same ridge: fitted on known items)
    built = build_index(model, tokenizer, cfg, CATALOG + ["new"], [TEXTS[i] for i in CATALOG] + [text], version="v0001")
    np.testing.assert_allclose(index.vectors[index.rows(["new"])], built.vectors[built.rows(["new"])], atol=1e-5)
    # text alone decides: another text, another vector
    index.add_items(["other"], ["Completely unrelated words"])
    assert not np.allclose(index.vectors[index.rows(["new"])], index.vectors[index.rows(["other"])])
    # retrievable and ranked by its vector like every other item, in its genre pool too
    q = user_vectors(model, cfg, [HISTORY[0]], [HISTORY[1]])[0]
    got = index.top_n(q, n=len(index))[0]
    assert got.rows.tolist() == _brute_force(index.vectors, q, len(index)) and "new" in got.item_ids
    assert "new" in index.top_n(q, n=len(index), allowed=index.genre_rows("Comedy"))[0].item_ids
    # an id the tables know but the build's catalogue lacked gets its table vector, not a text one
    small = build_index(model, tokenizer, cfg, KNOWN[:5], [TEXTS[i] for i in KNOWN[:5]], version="v0001")
    small.add_items(["7"], ["whatever the text says"])
    np.testing.assert_allclose(small.vectors[small.rows(["7"])], index.vectors[index.rows(["7"])])
    assert not small.from_text[small.rows(["7"])].any()


@pytest.mark.parametrize("pool_kind", ["genre", "ids", "mask", "large"])
def test_pools_and_exclude_history(export, index, pool_kind):
    model, _, cfg = export
    q = user_vectors(model, cfg, [HISTORY[0]], [HISTORY[1]])[0]
    if pool_kind == "genre":
        allowed = index.genre_rows("Comedy")
    elif pool_kind == "ids":
        allowed = index.rows(["2", "n1"])  # scored as a subset (small pool)
    elif pool_kind == "mask":
        allowed = np.arange(len(index)) % 2 == 0
    else:
        allowed = index.rows(CATALOG[1:])  # scored in full, the rest masked (large pool)
    rows = set(np.flatnonzero(allowed) if np.asarray(allowed).dtype == bool else allowed)
    seen = ["3", "n1", "not-in-catalogue"]
    got = index.top_n(q, n=4, allowed=allowed, exclude=[seen])[0]
    expected = _brute_force(index.vectors, q, 4, rows, set(index.rows(["3", "n1"])))
    assert got.rows.tolist() == expected and not set(got.item_ids) & set(seen)
    assert len(got.item_ids) == min(4, len(rows - set(index.rows(["3", "n1"]))))
    np.testing.assert_allclose(got.scores, index.vectors[got.rows] @ q, rtol=1e-5)


def test_pool_with_nothing_left_and_bad_inputs(index):
    q = np.ones(index.dim, np.float32)
    assert index.top_n(q, n=5, allowed=index.rows(["3"]), exclude=[["3"]])[0].item_ids == []
    assert index.genre_rows("Western").size == 0
    with pytest.raises(ValueError, match="'nope'"):
        index.rows(["1", "nope"])
    with pytest.raises(ValueError, match=r"needs \(B, 5\)"):
        index.top_n(np.ones(3), n=5)
    with pytest.raises(ValueError, match="one per user"):
        index.top_n(np.ones((2, index.dim)), n=5, exclude=[["3"]])


def test_save_load_round_trip_refuses_another_version_or_model(export, index, cfg, tmp_path):
    model, tokenizer, _ = export
    path = save_index(index, tmp_path)
    assert path.name == INDEX_FILE and [p.name for p in tmp_path.iterdir()] == [INDEX_FILE]  # no temp file left
    loaded = load_index(tmp_path, version="v0001", model=model, tokenizer=tokenizer, cfg=cfg)
    assert loaded.item_ids == index.item_ids and loaded.model_key == index.model_key
    np.testing.assert_array_equal(loaded.vectors, index.vectors)
    np.testing.assert_array_equal(loaded.from_text, index.from_text)
    np.testing.assert_array_equal(loaded.genre_rows("Drama"), index.genre_rows("Drama"))
    assert loaded.projection.alpha == index.projection.alpha
    # the attached model computes new items' vectors as the original index does
    loaded.add_items(["new"], ["A brand new film (2024) | Comedy"])
    index.add_items(["new"], ["A brand new film (2024) | Comedy"])
    np.testing.assert_allclose(loaded.vectors, index.vectors, atol=1e-6)
    with pytest.raises(ValueError, match="built for version 'v0001', not 'v0002'"):
        load_index(tmp_path, version="v0002")
    other, _ = _hybrid(cfg, seed=1)
    with pytest.raises(ValueError, match="other collaborative tables"):
        load_index(tmp_path, version="v0001", model=other)
    with pytest.raises(ValueError, match="no model attached"):
        load_index(tmp_path, version="v0001").add_items(["z"], ["text"])
    with pytest.raises(ValueError, match="no item index"):
        load_index(tmp_path / "missing", version="v0001")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_index(tmp_path, version="v0001")


def test_exact_search_has_recall_one_against_brute_force():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((5000, 17)).astype(np.float32)
    index = ItemIndex([f"i{r}" for r in range(5000)], vectors, version="synthetic")
    users = rng.standard_normal((20, 17)).astype(np.float32)
    history = [[f"i{r}" for r in rng.choice(5000, 30, replace=False)] for _ in range(20)]
    small = np.sort(rng.choice(5000, 60, replace=False))  # scored alone (a few items)
    large = np.flatnonzero(rng.random(5000) < 0.3)  # columns of a full pass
    history = [h + [f"i{small[0]}", f"i{large[-1]}"] for h in history]  # some exclusions fall inside the pools
    for allowed in (None, small, large):
        got = index.top_n(users, n=100, allowed=allowed, exclude=history)
        for q, h, res in zip(users, history, got):
            expected = _brute_force(vectors, q, 100, None if allowed is None else set(allowed), set(index.rows(h)))
            assert res.rows.tolist() == expected
            np.testing.assert_allclose(res.scores, vectors[res.rows] @ q, rtol=1e-4, atol=1e-5)


def test_ridge_recovers_a_linear_map_and_reports_its_fit():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 12))
    w = rng.standard_normal((12, 5))
    y = x @ w + 3.0 + 0.01 * rng.standard_normal((400, 5))
    proj = TextProjection.fit(x, y)
    assert proj.loo_r2 > 0.99 and proj.num_fit == 400
    np.testing.assert_allclose(proj(x[:3]), (x[:3] @ w + 3.0), atol=0.05)
    noise = TextProjection.fit(x, rng.standard_normal((400, 5)))
    assert noise.loo_r2 < 0.05 and noise.alpha >= 100.0  # noise: strong shrinkage wins


def test_text_encoder_encodes_each_distinct_text_once(export):
    model, tokenizer, cfg = export
    encoder = TextEncoder(model.lm, tokenizer, cfg.model.max_seq_len, batch_size=2)
    seen = []
    encode = encoder._encode
    encoder._encode = lambda texts: seen.append(list(texts)) or encode(texts)
    texts = ["Soft drinks | Grocery", "Ice | Frozen", "Soft drinks | Grocery", "Bread | Pastry", "Ice | Frozen"]
    out = encoder(texts)
    assert sorted(seen[0]) == sorted(set(texts))  # three encodings, not five
    np.testing.assert_array_equal(out[0], out[2])
    np.testing.assert_allclose(out, encode(texts), atol=1e-5)  # the same vectors as encoding every row


def test_missing_genres_of_any_kind_are_no_genres():
    import pandas as pd

    index = ItemIndex(["a", "b", "c", "d"], np.eye(4, dtype=np.float32), version="v0001",
                      genres=pd.array(["X|Y", pd.NA, None, "Y"], dtype="string").tolist()[:2] + [float("nan"), ["Y"]])
    assert index.genre_rows("Y").tolist() == [0, 3] and index.genre_rows("X").tolist() == [0]


def test_shortlist_ranks_by_the_whole_collaborative_logit_neighbour_terms_included(cfg):
    """The neighbour terms do not factorise, so the index alone misses the items they lift: the shortlist adds them
    for the items in the history items' neighbour lists, and then ranks as the collaborative part does."""
    from llmrec_ray.retrieval import neighbour_lift, shortlist_ids

    model, tokenizer = _hybrid(cfg)
    collab = CollabNet(len(KNOWN), cfg.model.collab.dim, neighbours=2)
    collab.load_state_dict({**model.collab.state_dict(), "nbr_rows": collab.nbr_rows, "nbr_sims": collab.nbr_sims},
                           strict=False)
    model.collab = collab
    index = build_index(model, tokenizer, cfg, CATALOG, [TEXTS[i] for i in CATALOG],
                        [GENRES[k % 3] for k in range(len(CATALOG))], version="v0001")
    history, ratings = ["3", "7"], [5.0, 1.0]  # "3" liked, "7" not
    pool = set(KNOWN) - set(history)
    hist = history_arrays(model.vocab, [history], [ratings], [[]], 5, 4.0)

    def collab_top(n):  # the collaborative logit of every pool item, the slow obvious way
        ids = sorted(pool)
        logits = predict_logits(collab, model.vocab.rows(ids), type(hist)(*(np.repeat(a, len(ids), 0) for a in (
            hist.rows, hist.present, hist.liked, hist.rating, hist.rated))))
        return [ids[k] for k in np.argsort(-logits, kind="stable")[:n]]

    plain = shortlist_ids(model, cfg, index, history, ratings, 4, pool=pool, exclude=history)
    assert neighbour_lift(model, cfg, history, ratings) == {} and plain == collab_top(4)  # no lists: the index's
    outside = [i for i in sorted(pool) if i not in collab_top(4)]  # 4 items below the top
    rows = model.vocab.rows
    with torch.no_grad():  # a and b list "3", c lists "7" (not the other way round); the neighbour terms weigh a lot
        for j, near in (("3", outside[:2]), ("7", outside[2:3])):
            for i in near:
                collab.nbr_rows[rows([i])[0], 0] = int(rows([j])[0])
                collab.nbr_sims[rows([i])[0], 0] = 0.9
        collab.user_features.weight[0, 6:10] = torch.tensor([4.0, 4.0, -4.0, 2.0])
    lift = neighbour_lift(model, cfg, history, ratings)
    assert set(lift) == set(outside[:3]) and lift[outside[0]] > 0 > lift[outside[2]]
    top = collab_top(4)
    assert set(outside[:2]) <= set(top)  # the lifted items now belong to the collaborative top 4 ...
    assert shortlist_ids(model, cfg, index, history, ratings, 4, pool=pool, exclude=history) == top  # ... and here
    assert outside[0] not in shortlist_ids(model, cfg, index, history, ratings, 4, pool=pool - {outside[0]})


def test_with_a_tree_head_the_shortlist_is_the_heads_top_n_of_a_wider_linear_list(cfg):
    """The tree head does not factorise: the index ranks n x serve.shortlist_widen items by the linear sum, and the
    head keeps its best n of them (items scored from text keep their linear places)."""
    import lightgbm as lgb

    from llmrec_ray.collab import HEAD_FEATURES, TreeHead
    from llmrec_ray.retrieval import shortlist_ids

    model, tokenizer = _hybrid(cfg)
    index = build_index(model, tokenizer, cfg, CATALOG, [TEXTS[i] for i in CATALOG],
                        [GENRES[k % 3] for k in range(len(CATALOG))], version="v0001")
    history, ratings = ["3", "7"], [5.0, 1.0]
    pool = set(KNOWN) - set(history)
    linear = shortlist_ids(model, cfg, index, history, ratings, 3, pool=pool)
    # a head that ranks by the items' like rates, which the linear sum does not read
    rng = np.random.default_rng(0)
    x = np.zeros((500, len(HEAD_FEATURES)), np.float32)  # only the like rate varies: no split reads another feature
    col = HEAD_FEATURES.index("item_like_rate")
    x[:, col] = rng.random(500)
    params = dict(objective="regression", num_leaves=4, min_data_in_leaf=5, use_missing=False, verbose=-1,
                  num_threads=1)
    booster = lgb.train(params, lgb.Dataset(x, x[:, col].copy(), params={"verbose": -1}), 50)  # a staircase of it
    with torch.no_grad():
        model.collab.item_like_rate.copy_(torch.from_numpy(rng.permutation(len(KNOWN) + 1) / (len(KNOWN) + 1.0)))
    model.collab.head = TreeHead.from_lightgbm(booster.dump_model())
    by_rate = sorted(pool, key=lambda i: -float(model.collab.item_like_rate[model.vocab.index[i]]))
    wide = cfg.model_copy(deep=True)
    wide.serve.shortlist_widen = 10  # 30 >= the 8 pool items: the head sees them all
    assert set(shortlist_ids(model, wide, index, history, ratings, 3, pool=pool)) == set(by_rate[:3])
    narrow = cfg.model_copy(deep=True)
    narrow.serve.shortlist_widen = 1  # the head only reorders the linear top 3
    assert set(shortlist_ids(model, narrow, index, history, ratings, 3, pool=pool)) == set(linear)
    assert set(by_rate[:3]) != set(linear)  # so the two cases differ
    # an item scored from text ("n1": the tables never saw it) keeps the place the linear ranking gives it
    mixed = shortlist_ids(model, wide, index, history, ratings, 7, pool=pool | {"n1", "n2"})
    linear_mixed = shortlist_ids(model.__class__(model.lm, _without_head(model.collab), model.vocab,
                                                 model.fusion_weights()), wide, index, history, ratings, 7,
                                 pool=pool | {"n1", "n2"})
    new_items = [i for i in linear_mixed if i in ("n1", "n2")]
    assert new_items and [i for i in mixed if i in ("n1", "n2")] == new_items and len(mixed) == 7


def _without_head(collab):
    import copy

    out = copy.copy(collab)
    out.head = None
    return out
