"""Fine-tune SmolLM2's upper layers 12-15 with a ranking loss on ShareGPT; score it on AlpacaEval.

Issue #4: the encoder tier's representation is SmolLM2-135M-Instruct's frozen hidden state after
decoder layer 16 at the last prompt token (``smollm2-l16``). This experiment asks whether
adapting that representation to length ranking, as vllm-ltr does with OPT-125m, ranks
AlpacaEval lengths better. Training uses ShareGPT ONLY (``load_sharegpt``; no AlpacaEval label
is seen before scoring).

Pipeline (everything under ``--cache``, default /tmp/rft):

1. Token ids: each prompt wrapped in the chat template exactly as the server wraps it
   (:meth:`rtlm_adapt.encoder.HiddenStateEncoder.token_ids`, ``--max-content-tokens``).
2. Frozen cache: the hidden states of EVERY prompt token after decoder layer ``--k`` (layers
   below k never change), fp16, for the ShareGPT pairs and the 805 AlpacaEval prompts.
3. Training: layers k..15 get rank-``--rank`` LoRA adapters on q/k/v/o/gate/up/down (plain
   torch, :func:`_lora_class`); a linear head on the standardised last-token layer-16 state
   (initialised by ridge on the frozen states) gives a score. Loss: RankNet (pairwise logistic)
   over every pair in a batch whose log lengths differ by > 0.1, plus ``--mse`` times the squared
   error on log1p(length) (batches are length-bucketed for speed, so the MSE term anchors the
   score across buckets). The epoch with the best Kendall tau on ``--val`` held-out ShareGPT
   pairs is kept.
4. Scoring on AlpacaEval, split by prompt id (25% held out, split seeds ``--seeds``), the
   protocol of ``benchmarks/studies/encoder_representation.py``:

   * ``zero_shot``: the head's score alone (no AlpacaEval label), on the held-out prompts;
   * ``ridge``: a per-model ridge (standardised, alpha by 5-fold CV tau on the training
     prompts) on the last-token layer-16 state, fitted on that model's training prompts;
   * both for the frozen model (``frozen``) and the fine-tuned one (``lora``).

Variant ``attnpool`` (``--variants attnpool``): no LoRA; a learned attention pooling over the
frozen layer-16 states of the prompt's own tokens, concatenated with the last token, linear
score, same loss (the ridge then runs on the 1152-dim pooled + last features).
``--diagnose`` re-reads a finished ``lora`` run's saved states (see :func:`diagnose`).

Usage (the runs behind benchmarks/results/ranking_finetune.json; ~36 min, ~9 min, ~16 min and
~3 min on one thread; the layer-12 cache, ~11 min of the first, is reused by the others)::

    export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
    python benchmarks/studies/ranking_finetune.py --epochs 2 --save-adapter /tmp/rft/adapter_e2.pt \
        --json /tmp/rft/run1.json
    python benchmarks/studies/ranking_finetune.py --variants attnpool --pool-epochs 12 \
        --json /tmp/rft/run2_attnpool.json
    python benchmarks/studies/ranking_finetune.py --diagnose --save-adapter /tmp/rft/adapter_e2.pt \
        --json /tmp/rft/diag.json      # (run right after the first command)
    python benchmarks/studies/ranking_finetune.py --epochs 1 --lr 2e-3 \
        --save-adapter /tmp/rft/adapter_lr2e-3.pt --json /tmp/rft/run3.json

One torch thread throughout (the run shares its machine).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from encoder_representation import ridge_cv_fit_predict  # noqa: E402

from rtlm_adapt.data import TokenCounter, alpaca_models, load_prompts, load_sharegpt  # noqa: E402
from rtlm_adapt.predictor.evaluation import kendall_tau, split_by_prompt  # noqa: E402

TOP = 16  # the representation layer (smollm2-l16)


@dataclass
class Data:
    """Cached layer-k states (fp16, rows concatenated; ``*_off`` are row offsets) and labels."""

    sg_states: np.ndarray
    sg_off: np.ndarray
    sg_y: np.ndarray  # log1p(ShareGPT response tokens)
    train: np.ndarray  # ShareGPT rows trained on
    val: np.ndarray  # ShareGPT rows that pick the epoch
    al_states: np.ndarray
    al_off: np.ndarray
    al_ids: list[str]  # AlpacaEval prompt ids, in row order
    samples: dict[str, list]  # AlpacaEval samples by model
    seeds: list[int]  # split seeds scored
    cache: Path


@dataclass
class Frozen:
    """The frozen model's last-token layer-16 states and the ridge head fitted on them."""

    sg_last: np.ndarray
    al_last: np.ndarray
    mu: np.ndarray  # standardisation of the states (ShareGPT training rows)
    sd: np.ndarray
    w: np.ndarray  # ridge head on the standardised states
    b: float
    val_tau: float


# -- model pieces -------------------------------------------------------------------------------


def load_model() -> tuple[Any, Any]:
    import torch

    from rtlm_adapt.serving.hf import load_smollm2

    lm, tok = load_smollm2(torch.float32)
    lm.eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm, tok


def _lora_class():
    import torch
    from torch import nn

    class _LoRALinear(nn.Module):
        """``base(x) + scale * B(A(x))``; A random, B zero, so training starts at the base."""

        def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
            super().__init__()
            self.base = base
            self.a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
            self.b = nn.Parameter(torch.zeros(base.out_features, rank))
            self.scale = alpha / rank

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + (x @ self.a.t() @ self.b.t()) * self.scale

    return _LoRALinear


PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def add_lora(lm: Any, k: int, rank: int, alpha: float) -> list[Any]:
    """Wrap the projections of layers k..TOP-1 in LoRA; returns the LoRA modules."""
    cls = _lora_class()
    mods = []
    for li in range(k, TOP):
        layer = lm.model.layers[li]
        for name in PROJ:
            parent_name, attr = name.split(".")
            parent = getattr(layer, parent_name)
            wrapped = cls(getattr(parent, attr), rank, alpha)
            setattr(parent, attr, wrapped)
            mods.append(wrapped)
    return mods


def lora_with_head(lm: Any, args: Any, w0: np.ndarray, b0: float) -> tuple[list, Any, list, Any]:
    """LoRA on layers ``args.k``..15, a linear score head started at the ridge ``(w0, b0)``,
    their trainable parameters and an AdamW optimiser over them."""
    import torch

    loras = add_lora(lm, args.k, args.rank, args.lora_alpha)
    head = torch.nn.Linear(lm.config.hidden_size, 1)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w0.astype(np.float32))[None])
        head.bias.fill_(b0)
    params = [p for m in loras for p in (m.a, m.b)] + list(head.parameters())
    return loras, head, params, torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)


def run_upper(lm: Any, h: Any, k: int) -> Any:
    """Decoder layers k..TOP-1 on states ``h`` (B, T, D) after layer k; right-padded batches
    need only the causal mask (a real token never attends to a later padding token)."""
    import torch

    b, t, _ = h.shape
    pos = torch.arange(t).unsqueeze(0).expand(b, t)
    cos_sin = lm.model.rotary_emb(h, pos)
    mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
    for li in range(k, TOP):
        h = lm.model.layers[li](h, attention_mask=mask, position_ids=pos,
                                position_embeddings=cos_sin)
    return h


# -- caching the frozen layer-k states ----------------------------------------------------------


def token_ids(lm: Any, tok: Any, prompts: list[str], max_content: int) -> list[list[int]]:
    from rtlm_adapt.encoder import HiddenStateEncoder

    enc = HiddenStateEncoder(model=(lm, tok), layer=TOP, max_content_tokens=max_content)
    return [enc.token_ids(p) for p in prompts]


def cache_states(lm: Any, ids: list[list[int]], k: int, path: Path, batch: int = 16
                 ) -> tuple[np.ndarray, np.ndarray]:
    """All tokens' states after layer k, fp16, concatenated; and the row offsets (n+1)."""
    import torch

    if path.is_file():
        z = np.load(path)
        return z["states"], z["offsets"]
    lens = np.array([len(x) for x in ids])
    offsets = np.concatenate([[0], np.cumsum(lens)])
    states = np.zeros((offsets[-1], lm.config.hidden_size), np.float16)
    order = np.argsort(lens, kind="stable")
    captured: list[Any] = []

    class Stop(Exception):
        pass

    def hook(_m: Any, _i: Any, out: Any) -> None:
        captured.append(out[0] if isinstance(out, tuple) else out)
        raise Stop

    handle = lm.model.layers[k - 1].register_forward_hook(hook)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for s in range(0, len(ids), batch):
                idx = order[s: s + batch]
                w = int(lens[idx].max())
                x = torch.full((len(idx), w), 2, dtype=torch.long)
                att = torch.zeros((len(idx), w), dtype=torch.long)
                for r, i in enumerate(idx):
                    x[r, : lens[i]] = torch.tensor(ids[i])
                    att[r, : lens[i]] = 1
                captured.clear()
                try:
                    lm.model(input_ids=x, attention_mask=att, use_cache=False)
                except Stop:
                    pass
                h = captured[0].numpy()
                for r, i in enumerate(idx):
                    states[offsets[i]: offsets[i + 1]] = h[r, : lens[i]]
                if (s // batch) % 50 == 0:
                    print(f"  cache {path.name}: {s + len(idx)}/{len(ids)} "
                          f"{time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    finally:
        handle.remove()
    np.savez(path, states=states, offsets=offsets)
    return states, offsets


def batch_tensor(states: np.ndarray, offsets: np.ndarray, idx: np.ndarray) -> tuple[Any, Any]:
    """Right-padded (B, T, D) float32 tensor of the rows ``idx``, and their lengths."""
    import torch

    lens = offsets[idx + 1] - offsets[idx]
    out = np.zeros((len(idx), int(lens.max()), states.shape[1]), np.float32)
    for r, i in enumerate(idx):
        out[r, : lens[r]] = states[offsets[i]: offsets[i + 1]]
    return torch.from_numpy(out), torch.from_numpy(lens)


def last_states(lm: Any, states: np.ndarray, offsets: np.ndarray, k: int,
                batch: int = 32) -> np.ndarray:
    """Last-token layer-16 states of every row (no grad), in row order."""
    import torch

    n = len(offsets) - 1
    lens = np.diff(offsets)
    order = np.argsort(lens, kind="stable")
    out = np.zeros((n, states.shape[1]), np.float32)
    with torch.no_grad():
        for s in range(0, n, batch):
            idx = order[s: s + batch]
            h, ln = batch_tensor(states, offsets, idx)
            top = run_upper(lm, h, k)
            out[idx] = top[torch.arange(len(idx)), ln - 1].numpy()
    return out


def all_states(lm: Any, states: np.ndarray, offsets: np.ndarray, k: int,
               batch: int = 32) -> np.ndarray:
    """Every token's layer-16 state (frozen upper layers), fp16, with the same offsets."""
    import torch

    lens = np.diff(offsets)
    order = np.argsort(lens, kind="stable")
    out = np.zeros_like(states)
    with torch.no_grad():
        for s in range(0, len(lens), batch):
            idx = order[s: s + batch]
            h, ln = batch_tensor(states, offsets, idx)
            top = run_upper(lm, h, k).numpy()
            for r, i in enumerate(idx):
                out[offsets[i]: offsets[i + 1]] = top[r, : ln[r]]
    return out


# -- training -----------------------------------------------------------------------------------


def length_batches(lens: np.ndarray, rows: np.ndarray, size: int, rng: np.random.Generator
                   ) -> list[np.ndarray]:
    """Batches of ``rows`` with similar (jittered) lengths, in random order."""
    key = lens[rows] * rng.uniform(0.8, 1.25, len(rows))
    srt = rows[np.argsort(key)]
    batches = [srt[i: i + size] for i in range(0, len(srt), size)]
    rng.shuffle(batches)
    return batches


def ranknet_loss(score: Any, y: Any, margin: float = 0.1) -> Any:
    """Mean logistic loss over the pairs whose targets differ by more than ``margin``."""
    import torch

    ds = score[:, None] - score[None, :]
    dy = y[:, None] - y[None, :]
    keep = dy > margin
    if not bool(keep.any()):
        return score.sum() * 0.0
    return torch.nn.functional.softplus(-ds[keep]).mean()


def ranking_step(opt: Any, score: Any, y: Any, mse: float) -> float:
    """One optimiser step on RankNet plus ``mse`` times the squared error; the loss."""
    loss = ranknet_loss(score, y) + mse * ((score - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def ridge_head(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    xc = x - x.mean(0)
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - y.mean()))
    return w, float(y.mean() - x.mean(0) @ w)


def standardise(x: np.ndarray, mu: np.ndarray, sd: np.ndarray, clip: float = 8.0) -> np.ndarray:
    return np.clip((x - mu) / sd, -clip, clip)


def _pool_class():
    import torch
    from torch import nn

    class _AttnPool(nn.Module):
        """Learned attention pooling over the prompt's own tokens (the shared system prefix
        is masked), concatenated with the last token, then a linear score."""

        def __init__(self, dim: int, hidden: int = 64, skip: int = 24) -> None:
            super().__init__()
            self.key = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
            self.out = nn.Linear(2 * dim, 1)
            self.skip = skip

        def features(self, z: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
            t = torch.arange(z.shape[1])[None]
            keep = (t >= self.skip) & (t < lens[:, None])
            logit = self.key(z).squeeze(-1).masked_fill(~keep, float("-inf"))
            pooled = (torch.softmax(logit, 1).unsqueeze(-1) * z).sum(1)
            return torch.cat([pooled, z[torch.arange(len(lens)), lens - 1]], 1)

        def forward(self, z: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
            return self.out(self.features(z, lens)).squeeze(-1)

    return _AttnPool


def train_attnpool(lm: Any, data: Data, args: Any, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray, list, float]:
    """Train :func:`_pool_class` on frozen layer-16 token states; returns the AlpacaEval
    features and scores of the epoch with the best ShareGPT validation tau, the history and
    that tau."""
    import torch

    sg_off, sg_y, train, val = data.sg_off, data.sg_y, data.train, data.val
    top_sg = all_states(lm, data.sg_states, sg_off, args.k)
    top_al = all_states(lm, data.al_states, data.al_off, args.k)
    al_off = data.al_off

    tok_mu = top_sg[: sg_off[-1]: 7].astype(np.float32).mean(0)
    tok_sd = top_sg[: sg_off[-1]: 7].astype(np.float32).std(0) + 1e-6
    mu_t, sd_t = torch.from_numpy(tok_mu), torch.from_numpy(tok_sd)
    model = _pool_class()(top_sg.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=args.pool_lr, weight_decay=1e-2)
    yt = torch.from_numpy(sg_y.astype(np.float32))
    lens = np.diff(sg_off)

    def z_of(states: np.ndarray, off: np.ndarray, idx: np.ndarray) -> tuple[Any, Any]:
        h, ln = batch_tensor(states, off, idx)
        return ((h - mu_t) / sd_t).clamp(-8, 8), ln

    def predict(states: np.ndarray, off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(off) - 1
        order = np.argsort(np.diff(off), kind="stable")
        feats = np.zeros((n, 2 * states.shape[1]), np.float32)
        with torch.no_grad():
            for s in range(0, n, 64):
                idx = order[s: s + 64]
                z, ln = z_of(states, off, idx)
                feats[idx] = model.features(z, ln).numpy()
            score = model.out(torch.from_numpy(feats)).squeeze(-1).numpy()
        return feats, score

    val_off = np.concatenate([[0], np.cumsum(lens[val])])
    val_states = np.concatenate([top_sg[sg_off[i]: sg_off[i + 1]] for i in val])
    history, best, best_tau = [], None, -1.0
    for epoch in range(1, args.pool_epochs + 1):
        t = time.perf_counter()
        losses = []
        for idx in length_batches(lens, train, args.batch, rng):
            z, ln = z_of(top_sg, sg_off, idx)
            losses.append(ranking_step(opt, model(z, ln), yt[idx], args.mse))
        _, sv = predict(val_states, val_off)
        vt = kendall_tau(sv, sg_y[val])
        history.append({"epoch": epoch, "train_s": time.perf_counter() - t,
                        "loss": float(np.mean(losses)), "sharegpt_val_tau": vt})
        print(f"attnpool epoch {epoch}: loss {np.mean(losses):.4f} val tau {vt:.3f}",
              file=sys.stderr, flush=True)
        if vt > best_tau:
            best_tau = vt
            best = {n: p.detach().clone() for n, p in model.state_dict().items()}
    assert best is not None
    model.load_state_dict(best)
    feats, score = predict(top_al, al_off)
    return feats, score, history, best_tau


# -- scoring on AlpacaEval ----------------------------------------------------------------------


def alpaca_scores(rep: np.ndarray, zero_shot: np.ndarray | None, ids: list[str],
                  samples: dict[str, list], seeds: list[int]) -> dict[str, Any]:
    """Per-seed median (and per-model) Kendall tau of the zero-shot score and per-model ridge."""
    pos = {i: r for r, i in enumerate(ids)}
    out: dict[str, Any] = {}
    for seed in seeds:
        zs, rd = {}, {}
        for m, smp in samples.items():
            rows = np.array([pos[s.id] for s in smp])
            y = np.log1p(np.array([s.response_tokens for s in smp], dtype=float))
            mask = split_by_prompt([s.id for s in smp], 0.25, seed)
            if zero_shot is not None:
                zs[m] = kendall_tau(zero_shot[rows][mask], y[mask])
            pred, _ = ridge_cv_fit_predict(rep[rows].astype(np.float64), y[:, None], ~mask, mask,
                                           seed)
            rd[m] = kendall_tau(pred[:, 0], y[mask])
        entry: dict[str, Any] = {"ridge_median": float(np.median(list(rd.values()))),
                                 "ridge_per_model": rd}
        if zs:
            entry.update(zero_shot_median=float(np.median(list(zs.values()))),
                         zero_shot_per_model=zs)
        out[str(seed)] = entry
    return out


def diagnose(args: Any) -> dict[str, Any]:
    """Offline checks on the states a ``lora`` run saved under ``--cache`` (and its
    ``--save-adapter`` head): per-model ridge on frozen and fine-tuned states together; the
    head's score plus a per-model ridge on its residuals (what the tier's online part does,
    fitted offline); and the all-labels diagnostic (a ridge that sees the held-out labels too:
    the linear ceiling of a representation, NOT a predictor)."""
    import torch

    cache = Path(args.cache)
    counter = TokenCounter.default()
    samples = {m: load_prompts(f"alpaca:{m}", tokenizer=counter) for m in alpaca_models()}
    al_ids = sorted({s.id for smp in samples.values() for s in smp}, key=int)
    pos = {i: r for r, i in enumerate(al_ids)}
    frozen = np.load(cache / "alpaca_frozen_last.npy").astype(np.float64)
    lora = np.load(cache / "alpaca_lora_last.npy").astype(np.float64)
    ad = torch.load(args.save_adapter)
    # the frozen head, refitted exactly as main() fits it (same split of the same pairs)
    sg_frozen = np.load(cache / "sharegpt_frozen_last.npy")
    sg = load_sharegpt(limit=args.n_sharegpt, seed=args.seed, tokenizer=counter)
    sg_y = np.log1p(np.maximum(1.0, np.array([s.response_tokens for s in sg], dtype=float)))
    perm = np.random.default_rng(args.seed).permutation(len(sg))
    train = np.sort(perm[args.val:])
    mu, sd = sg_frozen[train].mean(0), sg_frozen[train].std(0) + 1e-6
    w0, b0 = ridge_head(standardise(sg_frozen, mu, sd)[train].astype(np.float64), sg_y[train],
                        args.head_alpha)
    heads = {"frozen": standardise(frozen, mu, sd) @ w0 + b0,
             "lora": standardise(lora, ad["mu"].numpy(), ad["sd"].numpy())
             @ ad["head_w"].numpy()[0] + float(ad["head_b"])}
    reps = {"frozen": frozen, "lora": lora, "frozen+lora": np.hstack([frozen, lora])}
    out: dict[str, Any] = {}
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        taus: dict[str, list[float]] = {}
        for smp in samples.values():
            rows = np.array([pos[s.id] for s in smp])
            y = np.log1p(np.array([s.response_tokens for s in smp], dtype=float))
            mask = split_by_prompt([s.id for s in smp], 0.25, seed)
            for name, x in reps.items():
                pred, _ = ridge_cv_fit_predict(x[rows], y[:, None], ~mask, mask, seed)
                taus.setdefault(f"ridge_{name}", []).append(kendall_tau(pred[:, 0], y[mask]))
            for name in ("frozen", "lora"):
                off = heads[name][rows]
                pred, _ = ridge_cv_fit_predict(reps[name][rows], (y - off)[:, None], ~mask, mask,
                                               seed, offset=off)
                taus.setdefault(f"head+residual_ridge_{name}", []).append(
                    kendall_tau(off[mask] + pred[:, 0], y[mask]))
                pred, _ = ridge_cv_fit_predict(reps[name][rows], y[:, None],
                                               np.ones_like(mask), mask, seed)
                taus.setdefault(f"diag_all_labels_{name}", []).append(
                    kendall_tau(pred[:, 0], y[mask]))
        out[str(seed)] = {k: float(np.median(v)) for k, v in taus.items()}
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in out[str(seed)].items()),
              file=sys.stderr, flush=True)
    return out


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-sharegpt", type=int, default=5000,
                    help="ShareGPT pairs (train + val); 5000 with seed 0 is the prior's sample")
    ap.add_argument("--val", type=int, default=800, help="of which held out for epoch choice")
    ap.add_argument("--k", type=int, default=12, help="first trained layer (0-based index)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--mse", type=float, default=0.1, help="weight of the MSE anchor")
    ap.add_argument("--head-alpha", type=float, default=1000.0,
                    help="ridge penalty of the head's initialisation (standardised states)")
    ap.add_argument("--max-content-tokens", type=int, default=384,
                    help="prompt tokens kept for ShareGPT training (AlpacaEval: 384, as served)")
    ap.add_argument("--max-steps", type=int, default=0, help="stop an epoch after this many")
    ap.add_argument("--variants", default="lora", help="comma list of lora, attnpool")
    ap.add_argument("--pool-epochs", type=int, default=15)
    ap.add_argument("--pool-lr", type=float, default=1e-3)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default="/tmp/rft")
    ap.add_argument("--save-adapter", default="", help="write the LoRA + head here (.pt)")
    ap.add_argument("--diagnose", action="store_true",
                    help="only the offline checks of diagnose() on a finished lora run's cache "
                         "(needs --save-adapter); merged into --json")
    ap.add_argument("--json", default="benchmarks/results/ranking_finetune.json")
    args = ap.parse_args(argv)
    if args.diagnose:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.is_file() else {}
        old["diagnose"] = diagnose(args)
        path.write_text(json.dumps(old, indent=1))
        return 0

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timing: dict[str, float] = {}

    lm, tok = load_model()
    counter = TokenCounter.default()
    sg = load_sharegpt(limit=args.n_sharegpt, seed=args.seed, tokenizer=counter)
    sg_prompts = [s.prompt for s in sg]
    sg_y = np.log1p(np.maximum(1.0, np.array([s.response_tokens for s in sg], dtype=float)))
    models = alpaca_models()
    samples = {m: load_prompts(f"alpaca:{m}", tokenizer=counter) for m in models}
    prompt_of = {s.id: s.prompt for smp in samples.values() for s in smp}
    al_ids = sorted(prompt_of, key=int)

    t = time.perf_counter()
    sg_tok = token_ids(lm, tok, sg_prompts, args.max_content_tokens)
    al_tok = token_ids(lm, tok, [prompt_of[i] for i in al_ids], 384)
    sg_states, sg_off = cache_states(
        lm, sg_tok, args.k,
        cache / f"sg_k{args.k}_n{args.n_sharegpt}_s{args.seed}_c{args.max_content_tokens}.npz")
    al_states, al_off = cache_states(lm, al_tok, args.k, cache / f"alpaca_k{args.k}.npz")
    timing["cache_s"] = time.perf_counter() - t
    print(f"cache: {timing['cache_s']:.0f}s, ShareGPT mean tokens {np.diff(sg_off).mean():.0f}",
          file=sys.stderr, flush=True)

    perm = rng.permutation(len(sg))
    val, train = np.sort(perm[: args.val]), np.sort(perm[args.val:])

    # frozen baseline: last-token layer-16 states, head initialised by ridge on them
    t = time.perf_counter()
    sg_last0 = last_states(lm, sg_states, sg_off, args.k)
    al_last0 = last_states(lm, al_states, al_off, args.k)
    mu, sd = sg_last0[train].mean(0), sg_last0[train].std(0) + 1e-6
    z0 = standardise(sg_last0, mu, sd)
    w0, b0 = ridge_head(z0[train].astype(np.float64), sg_y[train], args.head_alpha)
    frozen_val = kendall_tau(z0[val] @ w0 + b0, sg_y[val])
    al_zero0 = standardise(al_last0, mu, sd) @ w0 + b0
    timing["frozen_pass_s"] = time.perf_counter() - t
    seeds = [int(s) for s in args.seeds.split(",") if s]
    data = Data(sg_states, sg_off, sg_y, train, val, al_states, al_off, al_ids, samples, seeds,
                cache)
    frozen = Frozen(sg_last0, al_last0, mu, sd, w0, b0, frozen_val)
    results: dict[str, Any] = {
        "args": vars(args),
        "frozen": {"sharegpt_val_tau": frozen_val,
                   "alpaca": alpaca_scores(al_last0, al_zero0, al_ids, samples, seeds)},
    }
    print(f"frozen: ShareGPT val tau {frozen_val:.3f}; "
          + "; ".join(f"seed {s}: zero-shot {v['zero_shot_median']:.3f} ridge "
                      f"{v['ridge_median']:.3f}" for s, v in results["frozen"]["alpaca"].items()),
          file=sys.stderr, flush=True)

    variants = [v for v in args.variants.split(",") if v]
    if "attnpool" in variants:
        t = time.perf_counter()
        feats, score, hist, vt = train_attnpool(lm, data, args, rng)
        results["attnpool"] = {"sharegpt_val_tau": vt, "history": hist,
                               "alpaca": alpaca_scores(feats, score, al_ids, samples, seeds)}
        timing["attnpool_s"] = time.perf_counter() - t
        print("attnpool: " + "; ".join(
            f"seed {s}: zero-shot {v['zero_shot_median']:.3f} ridge {v['ridge_median']:.3f}"
            for s, v in results["attnpool"]["alpaca"].items()), file=sys.stderr, flush=True)
    if "lora" in variants:
        train_lora(lm, data, frozen, args, rng, results, timing)
    timing["total_s"] = time.perf_counter() - t_start
    results["timing"] = timing
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def train_lora(lm: Any, data: Data, frozen: Frozen, args: Any, rng: np.random.Generator,
               results: dict, timing: dict) -> None:
    """LoRA on layers k..15 plus the linear head (see the module docstring); adds ``lora``,
    ``lora_history`` and ``lora_best_epoch`` to ``results``."""
    import torch

    sg_states, sg_off, sg_y, train, val = (data.sg_states, data.sg_off, data.sg_y, data.train,
                                           data.val)
    w0, b0, mu, sd, frozen_val = frozen.w, frozen.b, frozen.mu, frozen.sd, frozen.val_tau
    loras, head, params, opt = lora_with_head(lm, args, w0, b0)
    mu_t, sd_t = torch.from_numpy(mu), torch.from_numpy(sd)
    sg_lens = np.diff(sg_off)

    def score_of(top_last: Any) -> Any:
        return head(((top_last - mu_t) / sd_t).clamp(-8, 8)).squeeze(-1)

    def eval_rows(states: np.ndarray, off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        last = last_states(lm, states, off, args.k)
        with torch.no_grad():
            s = score_of(torch.from_numpy(last)).numpy()
        return last, s

    history = []
    best: dict[str, Any] = {"val_tau": frozen_val, "epoch": 0, "state": None}
    yt = torch.from_numpy(sg_y.astype(np.float32))
    for epoch in range(1, args.epochs + 1):
        t = time.perf_counter()
        batches = length_batches(sg_lens, train, args.batch, rng)
        if args.max_steps:
            batches = batches[: args.max_steps]
        run_loss = []
        for step, idx in enumerate(batches):
            h, ln = batch_tensor(sg_states, sg_off, idx)
            top = run_upper(lm, h, args.k)
            s = score_of(top[torch.arange(len(idx)), ln - 1])
            run_loss.append(ranking_step(opt, s, yt[idx], args.mse))
            if step % 25 == 0:
                print(f"  epoch {epoch} step {step}/{len(batches)} loss "
                      f"{np.mean(run_loss[-25:]):.4f} {time.perf_counter() - t:.0f}s",
                      file=sys.stderr, flush=True)
        train_s = time.perf_counter() - t
        val_off = np.concatenate([[0], np.cumsum(sg_lens[val])])
        val_states = np.concatenate([sg_states[sg_off[i]: sg_off[i + 1]] for i in val])
        _, sv = eval_rows(val_states, val_off)
        vt = kendall_tau(sv, sg_y[val])
        history.append({"epoch": epoch, "train_s": train_s, "steps": len(batches),
                        "loss": float(np.mean(run_loss)), "sharegpt_val_tau": vt})
        print(f"epoch {epoch}: {train_s:.0f}s loss {np.mean(run_loss):.4f} val tau {vt:.3f}",
              file=sys.stderr, flush=True)
        if vt > best["val_tau"]:
            best = {"val_tau": vt, "epoch": epoch,
                    "state": {n: p.detach().clone() for n, p in
                              enumerate(params)}}
    # the epoch with the best ShareGPT validation tau; the last one if none beat the frozen
    # model (then scored anyway, to show what training did on AlpacaEval)
    results["lora_history"] = history
    results["lora_best_epoch"] = best["epoch"]
    if best["state"] is not None:
        with torch.no_grad():
            for n, p in enumerate(params):
                p.copy_(best["state"][n])
    t = time.perf_counter()
    al_last, al_zero = eval_rows(data.al_states, data.al_off)
    results["lora"] = {"sharegpt_val_tau": best["val_tau"] if best["epoch"] else vt,
                       "alpaca": alpaca_scores(al_last, al_zero, data.al_ids, data.samples,
                                               data.seeds)}
    timing["alpaca_eval_s"] = time.perf_counter() - t
    np.save(data.cache / "alpaca_lora_last.npy", al_last)
    np.save(data.cache / "alpaca_frozen_last.npy", frozen.al_last)
    # the fine-tuned states of all ShareGPT rows, for refitting the tier's prior on them
    np.save(data.cache / "sharegpt_lora_last.npy", eval_rows(sg_states, sg_off)[0])
    np.save(data.cache / "sharegpt_frozen_last.npy", frozen.sg_last)
    print("lora: " + "; ".join(
        f"seed {s}: zero-shot {v['zero_shot_median']:.3f} ridge {v['ridge_median']:.3f}"
        for s, v in results["lora"]["alpaca"].items()), file=sys.stderr, flush=True)
    if args.save_adapter:
        torch.save({"k": args.k, "rank": args.rank, "alpha": args.lora_alpha,
                    "lora": [(m.a.detach(), m.b.detach()) for m in loras],
                    "head_w": head.weight.detach(), "head_b": head.bias.detach(),
                    "mu": mu_t, "sd": sd_t}, args.save_adapter)


if __name__ == "__main__":
    raise SystemExit(main())
