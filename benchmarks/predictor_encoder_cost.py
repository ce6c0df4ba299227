"""Encoder tier: predict/learn cost with the embedding memory full (embedding not included).

The kNN term scans the whole memory (``capacity`` finished requests, 384 float32 each) and the
ridge term is re-solved every ``solve_every`` updates, so the tier's predict/learn cost grows
with the memory until it is full; this measures the steady state. AlpacaEval prompts supply the
text (hashed words, uncertainty features); the embeddings are random unit vectors, which cost
the same as real ones.

    python benchmarks/predictor_encoder_cost.py   # prints p50/p99 in microseconds
    python benchmarks/predictor_encoder_cost.py --encoder smollm2-l16   # its prior (576 dims)
    # and the embedding itself (loads the encoder), ms per prompt at batch 1 and 16:
    python benchmarks/predictor_encoder_cost.py --encoder smollm2-l16 --embed --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from rtlm_adapt.data import TokenCounter, load_prompts
from rtlm_adapt.predictor import LengthPredictor


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default="alpaca:gpt4_1106_preview")
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--encoder", default="minilm", help="rtlm_adapt.encoder.ENCODERS name")
    ap.add_argument("--embed", action="store_true",
                    help="also time the embedding (ms/prompt at batch 1 and 16, real prompts)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for --embed")
    args = ap.parse_args(argv)

    samples = load_prompts(args.prompts, tokenizer=TokenCounter.default())
    p = LengthPredictor.pretrained("encoder", encoder=args.encoder)
    cap = p.embedding_model.capacity
    rng = np.random.default_rng(0)
    dim = p.embedding_model.dim
    emb = rng.normal(size=(len(samples), dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    feats = [p.features(s.prompt, embedding=e) for s, e in zip(samples, emb, strict=True)]
    lengths = [s.response_tokens for s in samples]
    n = len(feats)
    for i in range(cap):  # fill the memory
        p.learn_one(feats[i % n], lengths[i % n])
    pred_ns, learn_ns = [], []
    for i in range(args.calls):
        f = feats[i % n]
        t0 = time.perf_counter_ns()
        p.predict_one(f)
        t1 = time.perf_counter_ns()
        p.learn_one(f, lengths[i % n])
        t2 = time.perf_counter_ns()
        pred_ns.append(t1 - t0)
        learn_ns.append(t2 - t1)
    out = {
        "encoder": args.encoder,
        "dim": dim,
        "memory": int(p.embedding_model._n),
        "predict_us_p50": float(np.median(pred_ns)) / 1e3,
        "predict_us_p99": float(np.percentile(pred_ns, 99)) / 1e3,
        "learn_us_p50": float(np.median(learn_ns)) / 1e3,
        "learn_us_p99": float(np.percentile(learn_ns, 99)) / 1e3,
        "load_average": os.getloadavg(),
    }
    if args.embed:
        from rtlm_adapt.encoder import make_encoder

        enc = make_encoder(args.encoder, threads=args.threads)
        probe = [s.prompt for s in samples[:64]]
        enc.encode(probe[:2])  # load before timing
        import torch

        out["torch_threads"] = torch.get_num_threads()
        for bs in (1, 16):
            n = 16 if bs == 1 else 64
            t = time.perf_counter()
            enc.encode(probe[:n], batch_size=bs)
            out[f"embed_ms_per_prompt_batch{bs}"] = (time.perf_counter() - t) / n * 1e3
        out["load_average_after_embed"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
