"""Torch-free pieces the runtime shares with the PyTorch reference: the strided perplexity windows,
the line-batched encoding, token choice (greedy, temperature, top-k, top-p, repetition penalty), the
speculative acceptance rule and the negative log-likelihood of targets under logits."""
from __future__ import annotations

import numpy as np

from edgeloop.strided import windows  # noqa: F401  (re-exported: the runtime's public API)

from edgeloop.runtime.session import RuntimeInputError


def encode(tokenizer, text: str) -> np.ndarray:
    """Token ids of `text` (int64), encoded line by line, as edgeloop.model.data.encode does."""
    lines = text.splitlines(keepends=True)
    ids = [i for enc in tokenizer.encode_batch(lines, add_special_tokens=False) for i in enc.ids]
    return np.asarray(ids, dtype=np.int64)


def nll_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum over positions of -log softmax(logits)[target]; logits [N, V], targets [N]."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(-1)) + m[:, 0]
    return float((lse - x[np.arange(len(targets)), targets]).sum())


def check_sampling(temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> None:
    if not temperature >= 0:
        raise RuntimeInputError(f"temperature {temperature}: must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise RuntimeInputError(f"top_k {top_k}: must be >= 0 (0 = off)")
    if not 0 < top_p <= 1:
        raise RuntimeInputError(f"top_p {top_p}: must be in (0, 1]")
    if not repetition_penalty > 0:
        raise RuntimeInputError(f"repetition_penalty {repetition_penalty}: must be > 0 (1 = off)")


def distribution(logits: np.ndarray, seen: list[int], temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """What the next token is drawn from, as (token ids, their probabilities): the repetition penalty on `seen`
    tokens (positive logits divided, negative multiplied), then greedy (temperature 0: the argmax, probability 1)
    or the temperature-scaled softmax cut to the top-k tokens and the top-p nucleus, renormalised."""
    x = logits.astype(np.float64)
    if repetition_penalty != 1.0 and seen:
        idx = np.unique(np.asarray(seen, dtype=np.int64))
        v = x[idx]
        x[idx] = np.where(v > 0, v / repetition_penalty, v * repetition_penalty)
    if temperature <= 0:
        return np.array([int(x.argmax())]), np.ones(1)
    x = x / temperature
    order = np.argsort(-x, kind="stable")
    if top_k:
        order = order[:top_k]
    p = np.exp(x[order] - x[order[0]])
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)  # smallest prefix with mass >= top_p
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return order, p


def dense(order: np.ndarray, p: np.ndarray, vocab: int) -> np.ndarray:
    """distribution()'s (ids, probabilities) as a probability vector over the whole vocabulary."""
    out = np.zeros(vocab)
    out[order] = p
    return out


def choose(logits: np.ndarray, seen: list[int], rng: np.random.Generator, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0) -> int:
    """The next token from one row of logits [V], drawn from distribution() (greedy: its argmax)."""
    return draw(*distribution(logits, seen, temperature, top_k, top_p, repetition_penalty), rng, temperature <= 0)


def draw(order: np.ndarray, p: np.ndarray, rng: np.random.Generator, greedy: bool) -> int:
    """A token from distribution()'s (ids, probabilities): greedy, its argmax (rng untouched); else a draw."""
    return int(order[0]) if greedy else int(order[rng.choice(len(order), p=p)])


def acceptance(p: np.ndarray, q: np.ndarray, token: int) -> float:
    """Speculative sampling's chance of keeping a draft `token` drawn from q when the target is p (vectors over
    the vocabulary): min(1, p(token) / q(token)). With residual() on a rejection, the kept token is
    distributed exactly as p (Leviathan et al. 2023; Chen et al. 2023)."""
    return 1.0 if p[token] >= q[token] else float(p[token] / q[token])


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Where a rejected draft's replacement is drawn from: max(p - q, 0), normalised (p where it is all zero,
    which only happens when p = q, whose drafts are never rejected)."""
    r = np.maximum(p - q, 0.0)
    s = r.sum()
    return r / s if s > 0 else p
