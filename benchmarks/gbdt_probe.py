"""Probe: how strong can a classical model get on the quality protocol? (issue 11; a finding, not an arm)

    .venv/bin/python benchmarks/gbdt_probe.py [--label-weeks 20] [--linear | --mlp] [--leaky] [--topk 50]
                                              [--collab] [--text-sims] [--user-times] [--target label|rating]
                                              [--ease L2 [--ease-label] [--ease-topk K]] [--drop knn,gen]
                                              [--work out/quality]

Same data, split and scoring as benchmarks/quality_ml100k.py: for each of the 4 test weeks, a model frozen at the
week's start scores every row of it, a row's history = every earlier event of its user. The model: gradient-boosted
trees (LightGBM, 400 trees, 15 leaves) or, with --linear, logistic regression, on hand-made features of the row's
history (count, like rate, mean / spread of ratings, the last 5 ratings, deviation from the items' means) and of
the candidate (count, smoothed like rate and mean rating, spread, age, release year, like rate of its last two
weeks), and the history against the candidate: item-item similarity (adjusted cosine over co-ratings, shrunk) and
genre similarity, each as a weighted mean-centred rating and max / mean similarity (prefix knn_ / gen_).

--mlp: a small MLP instead (epochs chosen on the newest tenth). --topk K: each item keeps only its K most similar
items with positive similarity (the product's neighbour lists). --collab: adds the linear logit and features of the
product's collaborative part (tables fitted on the same snapshot rows). --text-sims: adds the history against the
candidate by the cosine of their texts' vectors from the frozen MiniLM (mean-pooled; prefix txt_), the genre
similarity's domain-free counterpart. This probe led to the collaborative part's tree head (llmrec_ray/collab.py),
which is the same idea inside the product. --user-times: adds the user's clock, which the product's requests do not
carry (days since the user's first event, minutes since the previous one, events in the hour before the row).
--target rating: the trees learn the rating by least squares instead of the like label (the score ranks the label).
--ease L2: adds the history through two EASE item-item regressions (Steck 2019; closed form with this L2) fitted on the
snapshot: which items a user rated, and the user-centred ratings (--ease-label: like labels, what the product has);
per row sum_j B[j, cand], sum_j centred_j * B_signed[j, cand] and sum_j (+1 liked / -1 not) * B[j, cand] (prefix
ease_). --ease-topk K keeps each candidate's K largest weights. The product's head reads the same three
(llmrec_ray/collab.py ease_features, with like labels).

Training rows are the events of the --label-weeks weeks before the test week; the item statistics and similarities
they read come from a snapshot of the events BEFORE those weeks (--leaky: from every event before the test week,
i.e. counting the rows' own labels). The test week reads a snapshot of every event before it.
Prints AUC per week and pooled.
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import pandas as pd

from quality_ml100k import fast_auc, load_protocol, week_bounds  # a script beside it

HISTORY = 50
DAY = 86400


class Features:
    def __init__(self, events: pd.DataFrame, examples: pd.DataFrame):
        self.items = {k: i + 1 for i, k in enumerate(sorted(set(events["item_id"])))}  # row 0: unknown
        self.users = {k: i for i, k in enumerate(sorted(set(events["user_id"])))}
        size = len(self.items) + 1
        texts = examples.groupby("item_id")["candidate_text"].first()  # "Title (year) | genre, genre"
        genres = sorted({g.strip() for t in texts for g in t.rsplit(" | ", 1)[-1].split(",")})
        g = np.zeros((size, len(genres)), np.float32)
        self.year = np.full(size, np.nan, np.float32)
        for item, text in texts.items():
            for name in text.rsplit(" | ", 1)[-1].split(","):
                g[self.items[item], genres.index(name.strip())] = 1.0
            year = re.search(r"\((\d{4})\)", text)
            self.year[self.items[item]] = float(year.group(1)) if year else np.nan
        g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-6)
        self.genre_sims = g @ g.T
        self.text_sims = None  # set by use_text_sims
        self.topk = 0
        self.texts = texts
        self.user_times = None  # set by use_user_times
        self.ease = 0.0  # --ease LAMBDA
        self.ease_topk = 0
        self.ease_label = False

    def use_text_sims(self, cfg) -> None:
        """Item-item cosine similarities of the item texts' vectors: the product's (llmrec_ray.model.encode_item_texts,
        the frozen MiniLM's mean-pooled sentence embeddings)."""
        from llmrec_ray.model import encode_item_texts

        encoded = encode_item_texts(cfg.model, list(self.texts)).numpy()
        vectors = np.zeros((len(self.items) + 1, encoded.shape[1]), np.float32)  # row 0 (unknown): zeros
        vectors[[self.items[k] for k in self.texts.index]] = encoded
        self.text_sims = vectors @ vectors.T

    def use_user_times(self, events: pd.DataFrame) -> None:
        """Per row: the user's first event time, previous event time (strictly before the row; the row's own time when
        none) and how many of the user's events fall in the hour before the row."""
        by_user = {u: np.sort(g.to_numpy()) for u, g in events.groupby("user_id")["timestamp"]}

        def lookup(rows: pd.DataFrame):
            first, prev, burst = (np.empty(len(rows)) for _ in range(3))
            for k, (u, t) in enumerate(zip(rows["user_id"].to_numpy(), rows["timestamp"].to_numpy())):
                ts = by_user[u]
                i = np.searchsorted(ts, t)  # events strictly before t
                first[k] = ts[0] if i else t
                prev[k] = ts[i - 1] if i else t
                burst[k] = i - np.searchsorted(ts, t - 3600)
            return first, prev, burst

        self.user_times = lookup

    def snapshot(self, ev: pd.DataFrame) -> dict:
        """Item statistics and item-item similarities of the events `ev` (what a model frozen after them knows)."""
        size, a = len(self.items) + 1, 10.0
        item = ev["item_id"].map(self.items).to_numpy()
        user = ev["user_id"].map(self.users).to_numpy()
        r, y = ev["rating"].to_numpy(float), ev["label"].to_numpy(float)
        cnt = np.bincount(item, minlength=size).astype(float)
        rate = (np.bincount(item, y, size) + a * y.mean()) / (cnt + a)
        mean = (np.bincount(item, r, size) + a * r.mean()) / (cnt + a)
        raw_mean = np.bincount(item, r, size) / np.maximum(cnt, 1)
        std = np.sqrt(np.maximum(np.bincount(item, r * r, size) / np.maximum(cnt, 1) - raw_mean ** 2, 0))
        first = pd.Series(ev["timestamp"].to_numpy(), index=item).groupby(level=0).min().reindex(range(size)).to_numpy(float)
        recent = ev["timestamp"].to_numpy() >= ev["timestamp"].max() - 14 * DAY
        rcnt = np.bincount(item[recent], minlength=size).astype(float)
        rrate = (np.bincount(item[recent], y[recent], size) + a * rate) / (rcnt + a)
        num_users = len(self.users)
        umean = np.bincount(user, r, num_users) / np.maximum(np.bincount(user, minlength=num_users), 1)
        centred, has = np.zeros((size, num_users), np.float32), np.zeros((size, num_users), np.float32)
        centred[item, user], has[item, user] = r - umean[user], 1.0
        norm = np.sqrt((centred * centred).sum(1)) + 1e-6
        co = has @ has.T
        sims = (centred @ centred.T) / np.outer(norm, norm) * (co / (co + 25.0))
        np.fill_diagonal(sims, 0.0)
        sims[0], sims[:, 0] = 0.0, 0.0
        if self.topk:  # each item keeps its topk most similar (positive) items only, as the product's lists
            sims = np.maximum(sims, 0.0)
            cut = -np.sort(-sims, axis=1)[:, self.topk - 1 : self.topk]
            sims = np.where(sims >= np.maximum(cut, 1e-12), sims, 0.0)
        out = dict(cnt=cnt, rate=rate, mean=mean, std=std, first=first, rcnt=rcnt, rrate=rrate, sims=sims,
                   global_rating=r.mean())
        if self.ease:  # EASE (Steck 2019): B = item-item regression weights, closed form, on the rated / centred matrix
            signed = centred
            if self.ease_label:  # user-centred like labels instead of ratings
                ulike = np.bincount(user, y, num_users) / np.maximum(np.bincount(user, minlength=num_users), 1)
                signed = np.zeros_like(centred)
                signed[item, user] = y - ulike[user]
            for name, x in (("ease_imp", has), ("ease_sig", signed)):
                p = np.linalg.inv(x @ x.T + self.ease * np.eye(size, dtype=np.float32))
                b = -p / np.diag(p)[None, :]
                np.fill_diagonal(b, 0.0)
                b[0], b[:, 0] = 0.0, 0.0
                if self.ease_topk:  # per candidate column c keep the ease_topk largest |B[j, c]|
                    cut = -np.sort(-np.abs(b), axis=0)[self.ease_topk - 1 : self.ease_topk]
                    b = np.where(np.abs(b) >= np.maximum(cut, 1e-12), b, 0.0)
                out[name] = b.astype(np.float32)
        return out

    def frame(self, rows: pd.DataFrame, snap: dict) -> pd.DataFrame:
        c = rows["item_id"].map(self.items).fillna(0).astype(int).to_numpy()
        hi = np.zeros((len(rows), HISTORY), np.int64)
        hr = np.full((len(rows), HISTORY), np.nan, np.float32)
        for k, (ids, rs) in enumerate(zip(rows["history_ids"], rows["history_ratings"])):
            m = min(len(ids), HISTORY)
            hi[k, :m] = [self.items.get(i, 0) for i in ids[:m]]
            hr[k, :m] = rs[:m]
        present = ~np.isnan(hr)
        n = present.sum(1)
        r = np.nan_to_num(hr)
        ubar = np.where(n > 0, r.sum(1) / np.maximum(n, 1), snap["global_rating"])
        centred = np.where(present, r - ubar[:, None], 0.0)
        liked = np.where(present, (r >= 4).astype(float), 0.0)
        known = present & (hi > 0)
        dev = np.where(known, r - snap["mean"][hi], 0.0).sum(1) / (known.sum(1) + 1)
        out = dict(n=np.log1p(n), like_rate=(liked.sum(1) + 2.2) / (n + 4), ubar=ubar,
                   ustd=np.sqrt((centred ** 2).sum(1) / np.maximum(n, 1)),
                   last5=np.where(present[:, :5], r[:, :5], 0).sum(1) / np.maximum(present[:, :5].sum(1), 1) - ubar,
                   last1=np.where(present[:, 0], r[:, 0], np.nan), rdev=dev,
                   icnt=np.log1p(snap["cnt"][c]), irate=snap["rate"][c], imean=snap["mean"][c], istd=snap["std"][c],
                   iage=(rows["timestamp"].to_numpy() - snap["first"][c]) / DAY, year=self.year[c],
                   irrate=snap["rrate"][c], ircnt=np.log1p(snap["rcnt"][c]), pred=snap["mean"][c] + dev)
        if self.user_times is not None:  # the user's clock: time since the first and the previous event, burst size
            t = rows["timestamp"].to_numpy()
            first, prev, burst = self.user_times(rows)
            out.update(utenure=np.log1p(np.maximum(t - first, 0) / DAY), ugap=np.log1p(np.maximum(t - prev, 0) / 60.0),
                       uburst=burst)
        if "ease_imp" in snap:  # score_c = sum_j x_j B[j, c] over the history
            bi, bs = snap["ease_imp"][hi, c[:, None]] * present, snap["ease_sig"][hi, c[:, None]] * present
            out.update(ease_imp=bi.sum(1), ease_sig=(bs * centred).sum(1), ease_pm=(bi * (2 * liked - present)).sum(1))
        families = [("knn", snap["sims"]), ("gen", self.genre_sims)]
        if self.text_sims is not None:
            families.append(("txt", self.text_sims))
        for name, sims in families:
            s = sims[c[:, None], hi] * present
            out[name] = (s * centred).sum(1) / (np.abs(s).sum(1) + 1e-3)
            out[name + "_max_liked"] = np.where(liked > 0, s, -1).max(1)
            out[name + "_max_disliked"] = np.where(present & (liked == 0), s, -1).max(1)
            out[name + "_mean"] = s.sum(1) / np.maximum(n, 1)
        return pd.DataFrame(out)


def collab_frame(cfg, fit_rows: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """The collaborative part's logit and features (llmrec_ray/collab.py) for `rows`, its tables fitted on `fit_rows`."""
    import torch

    from llmrec_ray.collab import CollabNet, batch_tensors, fit_collab
    from llmrec_ray.ids import ItemVocab, history_arrays

    c = cfg.model.collab
    vocab = ItemVocab(sorted(set(map(str, fit_rows["item_id"]))))
    net = CollabNet(len(vocab), c.dim, neighbours=c.neighbours)

    def hist(f):
        return history_arrays(vocab, f["history_ids"].tolist(), f["history_ratings"].tolist(),
                              f["history_labels"].tolist(), c.history_len, cfg.data.like_threshold)

    fit_collab(net, vocab.rows(fit_rows["item_id"].tolist()), hist(fit_rows), fit_rows["label"].to_numpy(),
               users=fit_rows["user_id"].to_numpy(), **{**c.fit_kwargs(), "head_fraction": 0.0})  # the linear logit
    t = batch_tensors(vocab.rows(rows["item_id"].tolist()), hist(rows))
    with torch.no_grad():
        h = {k: v for k, v in t.items() if k != "cand_rows"}
        _, f = net.user_side(**h)
        g = net.neighbour_features(t["cand_rows"], **h)
        logit = net(**t)
    cols = {"cf": logit.numpy()}
    cols.update({f"cf_f{i}": v for i, v in enumerate(torch.cat([f, g], -1).T.numpy())})
    return pd.DataFrame(cols)


def fit_predict(x_train: pd.DataFrame, y: np.ndarray, x_test: pd.DataFrame, linear: bool, mlp: bool = False,
                objective: str = "binary") -> np.ndarray:
    if mlp:
        return fit_predict_mlp(x_train, y, x_test)
    if linear:
        import torch

        a, b = (np.nan_to_num(x.to_numpy(np.float32)) for x in (x_train, x_test))
        mu, sd = a.mean(0), a.std(0) + 1e-6
        xa, xb = torch.tensor((a - mu) / sd), torch.tensor((b - mu) / sd)
        target = torch.tensor(y, dtype=torch.float32)
        lin = torch.nn.Linear(a.shape[1], 1)
        opt = torch.optim.LBFGS(lin.parameters(), lr=0.5, max_iter=300)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(lin(xa).squeeze(-1), target)
            (loss + 1e-4 * lin.weight.pow(2).sum()).backward()
            return loss

        opt.step(closure)
        return lin(xb).squeeze(-1).detach().numpy()
    import lightgbm as lgb
    params = dict(objective=objective, learning_rate=0.03, num_leaves=15, min_data_in_leaf=50, bagging_fraction=0.8,
                  bagging_freq=1, feature_fraction=0.8, lambda_l2=1.0, verbose=-1, seed=0, num_threads=2)
    return lgb.train(params, lgb.Dataset(x_train, y), 400).predict(x_test)


def fit_predict_mlp(x_train: pd.DataFrame, y: np.ndarray, x_test: pd.DataFrame, hidden: int = 64,
                    epochs: int = 30, seed: int = 0) -> np.ndarray:
    """A small MLP on the standardised features; epochs chosen on the newest 10% of training rows."""
    import torch

    a, b = (np.nan_to_num(x.to_numpy(np.float32)) for x in (x_train, x_test))
    mu, sd = a.mean(0), a.std(0) + 1e-6
    xa, xb = torch.tensor((a - mu) / sd), torch.tensor((b - mu) / sd)
    target = torch.tensor(y, dtype=torch.float32)
    n_val = len(y) // 10

    def run(n_fit, epochs):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(a.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
        opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-5)
        g = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(epochs):
            net.train()
            for idx in torch.randperm(n_fit, generator=g).split(512):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xa[idx]).squeeze(-1), target[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                losses.append(torch.nn.functional.binary_cross_entropy_with_logits(
                    net(xa[n_fit:]).squeeze(-1), target[n_fit:]).item() if n_fit < len(y) else 0.0)
        return net, losses

    _, losses = run(len(y) - n_val, epochs)
    chosen = int(np.argmin(losses)) + 1
    net, _ = run(len(y), chosen)
    print(f"  mlp: {chosen} epochs", flush=True)
    with torch.no_grad():
        return net(xb).squeeze(-1).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label-weeks", type=int, default=20)
    p.add_argument("--linear", action="store_true")
    p.add_argument("--mlp", action="store_true", help="a small MLP instead of the trees")
    p.add_argument("--leaky", action="store_true")
    p.add_argument("--topk", type=int, default=0, help="item-item similarities: keep each item's top k positive only")
    p.add_argument("--collab", action="store_true", help="add the collaborative part's logit and features (cf*)")
    p.add_argument("--text-sims", action="store_true", help="add the MiniLM text similarities (txt*)")
    p.add_argument("--drop", default="", help="comma-separated feature names or prefixes (knn, gen) to leave out")
    p.add_argument("--user-times", action="store_true", help="add the user's clock: tenure, gap, burst (utenure...)")
    p.add_argument("--target", choices=["label", "rating"], default="label",
                   help="what the trees learn: the like label (binary) or the rating (regression, L2)")
    p.add_argument("--ease", type=float, default=0.0, help="add EASE item-item regression scores, this L2 (ease_*)")
    p.add_argument("--ease-topk", type=int, default=0, help="keep each candidate's K largest EASE weights")
    p.add_argument("--ease-label", action="store_true", help="the signed EASE matrix from like labels, not ratings")
    p.add_argument("--work", default="out/quality")
    args = p.parse_args()
    if args.target == "rating" and (args.linear or args.mlp):
        p.error("--target rating: only the trees have a regression objective here; drop --linear / --mlp")
    cfg, keys, events, examples = load_protocol(args.work)
    feats = Features(events, examples)
    feats.topk = args.topk
    feats.ease, feats.ease_topk, feats.ease_label = args.ease, args.ease_topk, args.ease_label
    if args.text_sims:
        feats.use_text_sims(cfg)
    if args.user_times:
        feats.use_user_times(events)
    drop = [d for d in args.drop.split(",") if d]
    weeks, ys, ps = week_bounds(keys, 4), [], []
    for w, (_, start) in enumerate(weeks):
        end = weeks[w + 1][1] if w + 1 < len(weeks) else int(events["timestamp"].max()) + 1
        cut = start - args.label_weeks * 7 * DAY
        train = examples[(examples["timestamp"] >= cut) & (examples["timestamp"] < start)]
        test = examples[(examples["timestamp"] >= start) & (examples["timestamp"] < end)]
        x_train = feats.frame(train, feats.snapshot(events[events["timestamp"] < (start if args.leaky else cut)]))
        x_test = feats.frame(test, feats.snapshot(events[events["timestamp"] < start]))
        if args.collab:
            x_train = pd.concat([x_train, collab_frame(cfg, examples[examples["timestamp"] < cut], train)], axis=1)
            x_test = pd.concat([x_test, collab_frame(cfg, examples[examples["timestamp"] < start], test)], axis=1)
        cols = [c for c in x_train.columns if not any(c == d or c.startswith(d + "_") for d in drop)]
        ys.append(test["label"].to_numpy())
        if args.target == "label":
            target = train["label"].to_numpy(float)
        else:  # the examples carry the label only; (user, item) is unique in MovieLens
            target = train[["user_id", "item_id"]].merge(events, on=["user_id", "item_id"], how="left")["rating"].to_numpy(float)
        objective = "binary" if args.target == "label" else "regression"
        ps.append(fit_predict(x_train[cols], target, x_test[cols], args.linear, args.mlp, objective))
        print(f"week {w + 1}: {len(train):,} training rows, {len(test):,} scored, AUC {fast_auc(ys[-1], ps[-1]):.4f}",
              flush=True)
    print(f"pooled over 4 weeks: AUC {fast_auc(np.concatenate(ys), np.concatenate(ps)):.4f}")


if __name__ == "__main__":
    main()
