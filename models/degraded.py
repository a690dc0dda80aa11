"""Degraded-mode scoring: every group, every possible single erasure.

Framework-free (numpy in, numpy out): the caller supplies the encoder, the
parity model and the decoder as callables, so that evaluation can run the
served path (``coding_ext`` + ONNX Runtime) and training validation the
torch path, through the same scoring code.

Algorithm: for each of ``groupings`` seeded permutations of the N examples,
cut the permutation into G = N // k consecutive groups of k (the N mod k left
over sit that grouping out). Encode each group into one parity query, run the
parity model, and for each position j of the group decode
``F(X_j) ~ Fp(P) - sum_{i != j} F(X_i)`` from the base model's outputs of the
other k - 1 members. Every decoded output is scored against the true label
(top-1, top-5) and against the base model's own argmax (agreement).
"""

import numpy as np


def groups_for(n, k, groupings, seed):
    """Yields int arrays of shape (n // k, k): example indices of each group."""
    rng = np.random.default_rng(seed)
    count = (n // k) * k
    for _ in range(groupings):
        yield rng.permutation(n)[:count].reshape(-1, k)


def topk_hits(outputs, labels, topk):
    """bool array (N,): whether ``labels`` is among the ``topk`` largest outputs of each row."""
    topk = min(topk, outputs.shape[1])
    best = np.argpartition(-outputs, topk - 1, axis=1)[:, :topk]
    return (best == labels[:, None]).any(axis=1)


def score(X, y, base_outputs, k, encode, run_parity, decode, groupings=1, seed=0):
    """Degraded-mode accuracy of one parity model.

    Args:
        X: ndarray of shape (N, *S), float32, raw examples.
        y: ndarray of shape (N,), int64 labels.
        base_outputs: ndarray of shape (N, C), float32, the base model's outputs on X.
        k: group size.
        encode: maps an ndarray (k, G, *S) to the parity queries (G, *S).
        run_parity: maps parity queries (G, *S) to parity outputs (G, C).
        decode: maps (parity_output (G, C), available (k-1, G, C)) to (G, C).
        groupings: how many seeded random groupings to score.
        seed: seed of the groupings.

    Returns:
        dict with degraded_top1, degraded_top5, agreement (fractions) and
        decoded (how many reconstructions were scored).
    """
    if len(y) < k:
        raise ValueError(f"too few examples ({len(y)}) to form a group of k={k}")
    base_outputs = np.ascontiguousarray(base_outputs, dtype=np.float32)
    base_pred = base_outputs.argmax(axis=1)
    top1 = top5 = agree = total = 0
    for groups in groups_for(len(y), k, groupings, seed):
        parity_out = np.ascontiguousarray(run_parity(encode(np.ascontiguousarray(X[groups.T]))),
                                          dtype=np.float32)
        for j in range(k):
            others = [i for i in range(k) if i != j]
            available = np.ascontiguousarray(base_outputs[groups[:, others].T])
            decoded = decode(parity_out, available)
            erased = groups[:, j]
            pred = decoded.argmax(axis=1)
            top1 += int((pred == y[erased]).sum())
            top5 += int(topk_hits(decoded, y[erased], 5).sum())
            agree += int((pred == base_pred[erased]).sum())
            total += len(erased)
    return {"degraded_top1": top1 / total, "degraded_top5": top5 / total,
            "agreement": agree / total, "decoded": total}
