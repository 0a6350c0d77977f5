"""Self-speculative decoding: the same weights at fewer loops draft, the full depth verifies in one call.

    after the prompt (its prefill at R loops) the cache holds N tokens and token t is pending;
    one round:  draft   y_1..y_m one by one at d loops (d < R), m <= k, on top of the cache
                verify  [t, y_1..y_m] at R loops in ONE call from the cache as it was before the draft
                keep    the longest prefix y_1..y_a the verifier agrees with, then the verifier's own token at
                        a (the correction, or the bonus token when every draft was kept): a + 1 tokens
                cut     the cache back to N + 1 + a tokens (what plain decoding holds after those tokens)
Agreement: greedy, y_i equals the verifier's argmax; sampling, y_i ~ q_i is kept with min(1, p_i(y_i) /
q_i(y_i)), a rejected one replaced by a draw from norm(max(p_i - q_i, 0)) (speculative rejection sampling), so
each kept token is distributed as plain sampling's. q and p are the processed distributions (repetition
penalty, temperature, top-k, top-p: sampling.distribution) of the draft's and the verifier's logits.

What the draft leaves in the cache never survives a round: the verification starts from the pre-draft cache,
so every kept key/value is the full-depth one plain decoding writes. Growing caches: the draft's presents are
new tensors (the pre-draft ones are untouched) and the verifier's are sliced to N + 1 + a; in-place buffers
(kv.py): rows past the kept length are stale and are overwritten by the next round (the attention mask sets
the length). Greedy output therefore equals plain full-depth decoding token for token, up to ties between a
(k+1)-token call's rounding and one-token calls': about 1e-6 of the logits in fp32, but with MatMulNBits'
int8 activations (accuracy level 4) a call of another shape rounds some activations the other way and the
logits move by ~1e-3, so greedy decoding parts where plain decoding's top two logits are that close (the
tokens are then the same model's choice under other rounding, never an unverified draft). Each prompt is decoded on its own (batch 1), as in
Huginn's and LoopSpec's reference code.

Exact where a (k+1)-token call computes what k+1 one-token calls compute: the per-step cache (one slot per
(loop, layer), the reference's "full" cache). Two settings break that, and speculation refuses them unless
`approximate` is asked for: a cache shared across loops (kv.py "shared", Huginn's compress-s4), where the
call's tokens attend to each other at the same loop, as a prefill's do, while one-token decoding sees each
earlier token at its last loop, something no single call can compute before that token's depth is known; and
an exit gate with an early-exit threshold, whose call keeps computing (and caching) tokens that exited until
all have, where one-token decoding fills their deeper slots with the exit step's keys and values.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from edgeloop.runtime.sampling import acceptance, choose, dense, distribution, draw, residual
from edgeloop.runtime.session import RuntimeInputError

MAX_LOOKAHEAD = 64  # the most drafts one verification call checks
AUTO_DEPTHS = (1, 2, 3, 4, 6, 8, 12, 16)  # the draft depths --draft-loops auto tries (those below R)
AUTO_LOOKAHEAD = 12  # ... and lookaheads 1..this
CALIBRATION_TOKENS = 128  # the prompt tokens the calibration compares depths on
PRIOR_DRAFTS = 8  # auto: the prompt's agreement counts as this many drafts once the rounds show their own
FLAT = 0.03  # auto: lookaheads projected within this share of the best count as equal (the longest is taken)


@dataclass
class Speculation:
    """What self-speculation did: the draft depth d and lookahead k, verification calls (rounds), drafted and
    kept tokens, the loops every call ran (a verification call counts R once: it reads the weights once for its
    k + 1 tokens), the new tokens emitted after the first (which the prompt's prefill gives; generate_row counts
    them), and `auto`: the
    calibration that chose (d, k), when asked for."""
    draft_loops: int
    lookahead: int
    num_loops: int
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_calls: int = 0
    loops_run: int = 0
    tokens: int = 0
    auto: dict | None = None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def accepted_per_verify(self) -> float:
        return self.accepted / self.rounds if self.rounds else 0.0

    @property
    def loops_per_token(self) -> float:
        return self.loops_run / self.tokens if self.tokens else float(self.num_loops)

    def as_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate,
                "accepted_per_verify": self.accepted_per_verify, "loops_per_token": self.loops_per_token}


def check(rt, draft_loops: int | str, lookahead: int, num_loops: int, draft_min_prob: float = 0.0,
          exit_threshold: float | None = None, approximate: bool = False) -> None:
    """Refuse, in one line, what self-speculation cannot do with this export and these settings (and, unless
    `approximate`, what it cannot do exactly: the module docstring)."""
    if num_loops < 2:
        raise RuntimeInputError(f"self-speculation drafts at fewer loops than it verifies: num_loops {num_loops} "
                                f"leaves no draft depth (a model run at one loop)")
    if not rt.has_num_loops:
        raise RuntimeInputError(f"{rt.folder}: this export has no num_loops input (unrolled at max_loops = r), so "
                                f"it cannot draft at fewer loops; export with the Loop or --unroll --max-loops > r")
    if draft_loops != "auto":
        if isinstance(draft_loops, bool) or not isinstance(draft_loops, (int, np.integer)) \
                or not 1 <= draft_loops < num_loops:
            raise RuntimeInputError(f"draft_loops {draft_loops!r}: an integer in 1..{num_loops - 1} (fewer than "
                                    f"the {num_loops} loops that verify), or 'auto'")
    if isinstance(lookahead, bool) or not isinstance(lookahead, (int, np.integer)) or not 1 <= lookahead:
        raise RuntimeInputError(f"lookahead {lookahead!r}: a positive integer (the drafts per verification)")
    top = min(MAX_LOOKAHEAD, rt.ctx - 1)
    if lookahead > top:
        raise RuntimeInputError(f"lookahead {lookahead}: at most {top} (the context is {rt.ctx} tokens; one "
                                f"verification call checks at most {MAX_LOOKAHEAD})")
    if not approximate and rt.kv.shared:
        raise RuntimeInputError(f"{rt.folder}: its KV cache is shared across loops, where a verification call's "
                                f"tokens see each other at the same loop (as a prefill's do) and plain decoding's do "
                                f"not; export --kv-policy per-step for exact self-speculation, or accept that with "
                                f"--draft-approximate")
    if not approximate and rt.gated and exit_threshold is not None and exit_threshold < 1:
        raise RuntimeInputError(f"exit threshold {exit_threshold:g}: early exits inside a verification call are "
                                f"not plain decoding's (the call computes exited tokens on); verify at the full "
                                f"depth (threshold 1) for exact self-speculation, or accept it with "
                                f"--draft-approximate")
    if not 0.0 <= draft_min_prob < 1.0:
        raise RuntimeInputError(f"draft_min_prob {draft_min_prob!r}: a probability in [0, 1) (0 = draft all k)")


def truncate(rt, past: dict, n: int, in_place: bool) -> dict:
    """The cache cut back to its first n tokens: in-place buffers as they are (the mask sets the length), a
    growing cache sliced (numpy arrays, or onnxruntime values copied back into onnxruntime)."""
    if in_place:
        return past
    import onnxruntime as ort

    out = {}
    for name, v in past.items():
        if isinstance(v, ort.OrtValue):
            out[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :n]))
        else:
            out[name] = v[:, :, :n]
    return out


def _call(rt, ids: Sequence[int], n_past: int, past, loops: int, q, in_place: bool):
    """One forward of `ids` after n_past cached tokens (batch 1, no padding)."""
    x = np.asarray([ids], np.int64)
    S = x.shape[1]
    return rt.forward(x, np.ones((1, n_past + S), np.int64), np.arange(n_past, n_past + S, dtype=np.int64)[None],
                      past, loops, q, keep_kv=True, in_place=in_place)


class Decoder:
    """One prompt's self-speculative decoding state (batch 1): the cache `past` holding `length` tokens, the
    pending token, and the figures. prefill() runs the prompt at R loops and picks the first token; each
    round() drafts, verifies and keeps what the verifier agrees with, returning the kept tokens."""

    def __init__(self, rt, R: int, d: int, k: int, q, sampling: dict, rng: np.random.Generator, stops: set[int],
                 past, in_place: bool, draft_min_prob: float = 0.0):
        self.rt, self.R, self.d, self.k, self.q = rt, R, d, k, q
        self.sampling, self.rng, self.stops, self.in_place = sampling, rng, stops, in_place
        self.greedy = sampling["temperature"] <= 0
        self.draft_min_prob = draft_min_prob
        self.past, self.length, self.pending = past, 0, -1
        self.seen: list[int] = []
        self.stats = Speculation(d, k, R)
        self.last_loops: list[int] = []  # the loops each token of the last round's verification ran

    def prefill(self, prompt: list[int]) -> tuple[int, np.ndarray]:
        """The prompt through the cache at R loops: (the first new token, the prompt's logits [S, V])."""
        logits, self.past = _call(self.rt, prompt, 0, self.past, self.R, self.q, self.in_place)
        self.length, self.seen = len(prompt), list(prompt)
        self.pending = choose(logits[0, -1], self.seen, self.rng, **self.sampling)
        self.last_loops = [_loops_of(self.rt, self.R, -1)]
        self.seen.append(self.pending)
        return self.pending, logits[0]

    def round(self, m_max: int) -> list[int]:
        """Draft up to min(k, m_max) tokens at d loops, verify [pending, drafts] at R in one call, keep the
        agreed prefix and the verifier's next token (returned; the last one becomes pending), cut the cache."""
        rt, st, sp = self.rt, self.stats, self.sampling
        seen = self.seen[:-1]  # what precedes the pending token
        t, N = self.pending, self.length
        drafts, qs = [], []
        dpast, x = self.past, t
        for i in range(min(self.k if self.d else 0, m_max)):  # one token at a time at d loops, thrown away after
            dl, dpast = _call(rt, [x], N + i, dpast, self.d, self.q, self.in_place)
            st.draft_calls += 1
            st.loops_run += _loops_of(rt, self.d, 0)
            order, p = distribution(dl[0, -1], seen + [t] + drafts, **sp)
            y = draw(order, p, self.rng, self.greedy)
            drafts.append(y)
            if not self.greedy:
                qs.append(dense(order, p, rt.vocab_size))
            if y in self.stops or (self.draft_min_prob and _top1(dl[0, -1]) < self.draft_min_prob):
                break
            x = y
        vl, vpast = _call(rt, [t] + drafts, N, self.past, self.R, self.q, self.in_place)  # from the pre-draft cache
        st.rounds += 1
        st.drafted += len(drafts)
        st.loops_run += _loops_of(rt, self.R, None)
        a, nxt = 0, None
        for i, y in enumerate(drafts):
            prefix = seen + [t] + drafts[:i]
            if self.greedy:
                target = choose(vl[0, i], prefix, self.rng, **sp)
                if target != y:
                    nxt = target
                    break
            else:
                pv = dense(*distribution(vl[0, i], prefix, **sp), rt.vocab_size)
                if self.rng.random() >= acceptance(pv, qs[i], y):
                    nxt = int(self.rng.choice(rt.vocab_size, p=residual(pv, qs[i])))
                    break
            a += 1
        if nxt is None:  # every draft kept: the verifier's token after the last one
            nxt = choose(vl[0, a], seen + [t] + drafts, self.rng, **sp)
        st.accepted += a
        kept = drafts[:a] + [nxt]
        self.last_loops = [_loops_of(rt, self.R, i) for i in range(len(kept))]
        self.past = vpast if a == len(drafts) else truncate(rt, vpast, N + 1 + a, self.in_place)
        self.length = N + 1 + a
        self.pending = nxt
        self.seen += kept
        return kept


def generate_row(rt, prompt: list[int], max_new_tokens: int, R: int, d: int | str, k: int, q, sampling: dict,
                 rng: np.random.Generator, stops: set[int], past, in_place: bool,
                 on_token: Callable[[int], None] | None = None, draft_min_prob: float = 0.0, room: int | None = None,
                 ) -> tuple[list[int], str, list[int], Speculation]:
    """One prompt decoded with self-speculation: (new tokens, finish reason, loops of each, figures).
    `past`: empty pasts, or in-place buffers of `room` tokens (at least len(prompt) + max_new_tokens)."""
    new: list[int] = []
    loops: list[int] = []
    dec = Decoder(rt, R, 0 if d == "auto" else d, k, q, sampling, rng, stops, past, in_place, draft_min_prob)
    if max_new_tokens == 0 or len(prompt) >= rt.ctx:
        return new, "length" if max_new_tokens == 0 else "context", loops, dec.stats
    first, logits = dec.prefill(prompt)
    adapt = None
    if d == "auto":
        auto = calibrate(rt, prompt, logits, dec.past, R, k, q, sampling, in_place, room or rt.ctx)
        dec.d, dec.k = auto["draft_loops"], auto["lookahead"]
        dec.stats = Speculation(dec.d, dec.k, R, auto=auto)
        adapt = auto.get("costs")
    tokens = [first]

    def done(why: str):
        dec.stats.tokens = len(new) - 1  # what was emitted after the prefill's token (a round may keep more)
        return new, why, loops, dec.stats

    while True:
        for tok, lp in zip(tokens, dec.last_loops):
            new.append(tok)
            loops.append(lp)
            if on_token is not None:
                on_token(tok)
            if tok in stops:
                return done("stop")
            if len(new) >= max_new_tokens:
                return done("length")
        if dec.length >= rt.ctx:
            return done("context")
        tokens = dec.round(min(max_new_tokens - len(new) - 1, rt.ctx - 1 - dec.length))
        if adapt and dec.d:  # auto: the lookahead follows the agreement the rounds show
            dec.k = dec.stats.auto["lookahead_used"] = lookahead_for(adapt, dec.stats.accepted, dec.stats.drafted)


def _loops_of(rt, L: int, at: int | None) -> int:
    """The loops the last call ran for the token at position `at` of its row (an exit-gated export: where it
    exited; None: the most any token of the call ran), else L."""
    if not rt.gated or rt.last_exit_step is None:
        return L
    steps = rt.last_exit_step[0]
    return int(steps.max() if at is None else steps[at]) + 1


def _top1(logits: np.ndarray) -> float:
    x = logits.astype(np.float64)
    return float(1.0 / np.exp(x - x.max()).sum())


def tokens_per_round(alpha: float, k: int) -> float:
    """Expected tokens a round of k drafts yields when each is kept with probability alpha (independently):
    1 + alpha + ... + alpha^k."""
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def lookahead_for(costs: dict, accepted: int, drafted: int) -> int:
    """The lookahead with the most tokens per second at the agreement seen so far: the calibration's estimate
    as a prior worth PRIOR_DRAFTS drafts, updated by the drafts kept / made; costs: calibrate()'s cost model
    (draft_s: one draft step, verify_s: [a verification of 1 token, its extra seconds per token], k_max)."""
    alpha = (costs["agreement"] * PRIOR_DRAFTS + accepted) / (PRIOR_DRAFTS + drafted)
    v1, per = costs["verify_s"]
    rate = {k: tokens_per_round(alpha, k) / (k * costs["draft_s"] + v1 + per * k) for k in range(1, costs["k_max"] + 1)}
    # the curve is flat near its top, and single timed calls overstate what calls cost inside a generation (the
    # drafts and the verification share warm caches there): the longest lookahead within FLAT of the best
    return max(k for k, v in rate.items() if v >= (1 - FLAT) * max(rate.values()))


def calibrate(rt, prompt: list[int], full_logits: np.ndarray, past, R: int, k_max: int, q, sampling: dict,
              in_place: bool, room: int, repeats: int = 3) -> dict:
    """--draft-loops auto: (d, k) with the most tokens per second expected, from the prompt itself.
    Agreement a_d of the depth-d and the depth-R next-token choices over the prompt's first CALIBRATION_TOKENS
    tokens (greedy: the argmax equal; sampling: sum min(p, q), one minus their total variation), Laplace-
    smoothed; the cost of a one-token call at each depth d and of a verification of 1 and k_max + 1 tokens at
    R (linear between), timed on the cache the prefill left (median of `repeats`). A round of k drafts yields
    (1 - a^(k+1)) / (1 - a) tokens for k c_d + v(k + 1) seconds. k_max: the largest lookahead tried (the
    caller's lookahead, at least AUTO_LOOKAHEAD; no further than the cache reaches: `room` tokens). Returns the
    choice (draft_loops 0: plain decoding, when no (d, k) is projected faster), the projected speed-up over plain
    decoding, the table, and the chosen depth's cost model, by which generate_row re-picks the lookahead after
    every round from the agreement the rounds show (lookahead_for; a prompt is often less predictable than the
    model's own continuation)."""
    greedy = sampling["temperature"] <= 0
    n = min(len(prompt), CALIBRATION_TOKENS)
    depths = [d for d in AUTO_DEPTHS if d < R]
    N = len(prompt)
    k_max = min(max(k_max, AUTO_LOOKAHEAD), room - 1 - N, rt.ctx - 1 - N)
    if k_max < 1 or not depths:
        return {"draft_loops": 0, "lookahead": 0, "projected_speedup": 1.0, "why": "no room to draft"}

    def choices(logits):
        if greedy:
            return [int(l.argmax()) for l in logits]
        return [dense(*distribution(l, prompt[:i + 1], **sampling), rt.vocab_size) for i, l in enumerate(logits)]

    target = choices(full_logits[:n])

    def timed(ids, loops) -> float:
        ts = []
        _call(rt, ids, N, past, loops, q, in_place)  # a new shape's first call allocates: not timed
        for _ in range(repeats):
            t0 = time.perf_counter()
            _call(rt, ids, N, past, loops, q, in_place)  # writes past the kept length only: overwritten later
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

    probe = [int(prompt[-1])] * (k_max + 1)
    v1, vk = timed(probe[:1], R), timed(probe, R)
    rows = []
    for d in depths:
        logits, _ = rt.forward(np.asarray([prompt[:n]], np.int64), np.ones((1, n), np.int64),
                               np.arange(n, dtype=np.int64)[None], rt.empty_past(1), d, q)
        got = choices(logits[0])
        if greedy:
            agree = sum(int(a == b) for a, b in zip(got, target))
        else:
            agree = float(sum(np.minimum(a, b).sum() for a, b in zip(got, target)))
        alpha = (agree + 1.0) / (n + 2.0)
        c_d = timed(probe[:1], d)
        for kk in range(1, k_max + 1):
            tokens = tokens_per_round(alpha, kk)
            cost = kk * c_d + v1 + (vk - v1) * (kk / k_max)
            rows.append({"draft_loops": d, "lookahead": kk, "agreement": round(alpha, 4),
                         "draft_ms": round(1000 * c_d, 3), "tokens_per_round": round(tokens, 3),
                         "speedup": round(tokens / cost * v1, 3)})
    best = max(rows, key=lambda r: r["speedup"])
    if best["speedup"] <= 1.0:  # drafting does not pay here: plain decoding (rounds of one verified token)
        best = {**best, "draft_loops": 0, "lookahead": 0}
    costs = {"agreement": best["agreement"], "draft_s": best["draft_ms"] / 1000, "k_max": k_max,
             "verify_s": [v1, (vk - v1) / k_max]}
    return {"draft_loops": best["draft_loops"], "lookahead": best["lookahead"], "projected_speedup": best["speedup"],
            "costs": costs,
            "agreement": best["agreement"], "verify_ms": [round(1000 * v1, 3), round(1000 * vk, 3)],
            "calibration_tokens": n, "table": rows}
