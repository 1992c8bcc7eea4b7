"""SuffixDecoding (arXiv 2411.04975): draft tokens from text already seen, so no draft model is needed.

Two indexes feed the drafts: one per request over its prompt and output, and one global index over the
responses of finished requests (at most ``max_cached`` of them, the oldest evicted first). For the context's
tail the longest matches are found; from each, the walk follows the most frequent continuation, a token's
probability being the running product of ``count(s + t) / count(s)``, and stops under ``min_prob``. A match of
``m`` tokens may draft ``min(num_speculative_tokens, m)`` tokens; the draft of best score (sum of
probabilities) wins, the longer match on ties, the request's own index over the global one.

The indexes are suffix automata rather than the paper's suffix trees: the same occurrence counts of every
substring, but an appended token costs amortized O(1) dict updates in Python where a depth-64 suffix tree
costs 64. Every rank runs the same speculator on the same tokens, so drafts agree without a collective.
"""

from __future__ import annotations

from collections import deque

from shiftlib.engine.scheduler import Scheduler
from shiftlib.engine.sequence import Sequence

SPECULATIVE = (None, "suffix")
NONE, STALE = -1, -2  # best-child markers: no child yet; a child lost an occurrence and may no longer lead


class SuffixIndex:
    """Occurrence counts of every substring of a set of token sequences (a generalized suffix automaton).

    A state stands for substrings that end at the same positions; ``count[v]`` is how many positions of live
    sequences that is, and ``best[v]`` the token of its most frequent continuation (the smallest on ties),
    kept up to date as tokens arrive: only the states of the previous prefix's suffixes gain a child
    occurrence. A removed sequence only lowers counts (its states stay, counted zero) and marks the
    best children it lowered stale; the automaton is rebuilt from the live sequences once dead tokens
    outnumber them. ``version`` changes with every change.
    """

    def __init__(self) -> None:
        self.next: list[dict[int, int]] = [{}]
        self.link, self.length, self.count, self.best = [-1], [0], [0], [NONE]
        self.ends: dict[int, list[int]] = {}  # sequence key -> the state of each of its prefixes
        self.tokens: dict[int, list[int]] = {}
        self.dead = self.version = 0

    def extend(self, key: int, tokens: list[int]) -> None:
        """Append ``tokens`` to sequence ``key`` (a new one if unseen)."""
        self.version += 1
        ends = self.ends.setdefault(key, [])
        self.tokens.setdefault(key, []).extend(tokens)
        nxt, link, length, count, best = self.next, self.link, self.length, self.count, self.best
        last = ends[-1] if ends else 0
        for t in tokens:
            p = last
            q = nxt[p].get(t)
            if q is None:  # a new prefix: a state of its own
                last = len(length)
                nxt.append({})
                link.append(0)
                length.append(length[p] + 1)
                count.append(1)  # the position it ends
                best.append(NONE)
                # the previous prefix's suffixes without a child on t get the new state, which occurs once: their
                # best child is settled here, so the walk of the suffixes below starts after them
                while p != -1:
                    kids = nxt[p]
                    if t in kids:
                        break
                    kids[t] = last
                    b = best[p]
                    if b == NONE:
                        best[p] = t
                    elif b >= 0:
                        cb = count[kids[b]]
                        if cb < 1 or (cb == 1 and t < b):
                            best[p] = t
                    p = link[p]
                if p != -1:
                    q = nxt[p][t]
                    link[last] = q if length[q] == length[p] + 1 else self._split(p, t, q)
                v = link[last]
            else:  # the prefix already occurs (in another sequence): reuse or split its state
                last = q if length[q] == length[p] + 1 else self._split(p, t, q)
                v = last
            ends.append(last)
            while v != -1:  # the new position ends every suffix of the prefix: one more occurrence of each
                count[v] += 1
                v = link[v]
            v = p
            while v != -1:  # ... and those are the children on t of the previous prefix's other suffixes
                b = best[v]
                if b == NONE:
                    best[v] = t
                elif b >= 0 and b != t:
                    kids = nxt[v]
                    c, cb = count[kids[t]], count[kids[b]]
                    if c > cb or (c == cb and t < b):
                        best[v] = t
                v = link[v]

    def _split(self, p: int, t: int, q: int) -> int:
        """Give the strings of ``q`` up to ``length[p] + 1`` tokens a state of their own."""
        clone = self._state(self.length[p] + 1, dict(self.next[q]), self.link[q], self.count[q], self.best[q])
        self.link[q] = clone
        while p != -1 and self.next[p].get(t) == q:
            self.next[p][t] = clone
            p = self.link[p]
        return clone

    def _state(self, length: int, nxt: dict[int, int], link: int, count: int, best: int) -> int:
        self.next.append(nxt)
        self.link.append(link)
        self.length.append(length)
        self.count.append(count)
        self.best.append(best)
        return len(self.length) - 1

    def remove(self, key: int) -> None:
        self.version += 1
        link, count, best = self.link, self.count, self.best
        prev = 0
        for v, t in zip(self.ends.pop(key), self.tokens[key]):
            u = v
            while u != -1:
                count[u] -= 1
                u = link[u]
            u = prev
            while u != -1:
                if best[u] == t:
                    best[u] = STALE
                u = link[u]
            prev = v
        self.dead += len(self.tokens.pop(key))
        if self.dead > sum(map(len, self.tokens.values())):
            live, version = self.tokens, self.version
            self.__init__()
            self.version = version
            for k, toks in live.items():
                self.extend(k, toks)

    def match(self, tokens: list[int], v: int = 0, m: int = 0) -> tuple[int, int]:
        """State and length of the longest suffix of ``tokens`` that occurs in a live sequence, given those of
        the tokens before them (``v``, ``m``)."""
        nxt, count = self.next, self.count
        for t in tokens:
            u = nxt[v].get(t)
            while v and not (u and count[u]):
                v = self.link[v]
                m, u = self.length[v], nxt[v].get(t)
            if u and count[u]:
                v, m = u, m + 1
        return v, m

    def draft(self, v: int, m: int, limit: int, min_prob: float, best: tuple[float, list[int]]) -> tuple[float, list]:
        """The best of ``best`` and the drafts of the suffixes (``m`` tokens at most) that state ``v`` matched.

        A match of ``n`` tokens drafts ``min(limit, n)`` at most; shorter matches come later and win only with
        a strictly higher score, and are skipped once their cap cannot beat it.
        """
        nxt, count, length, link, kid = self.next, self.count, self.length, self.link, self.best
        while v > 0:
            up = link[v]
            if m > length[v]:
                m = length[v]
            if m > length[up] and kid[v] != NONE:  # else its suffixes are all longer than m, or it has no child
                cap = limit if limit < m else m
                if cap <= best[0]:
                    break
                u, prob, score, tokens = v, 1.0, 0.0, []
                while len(tokens) < cap and kid[u] != NONE:
                    if kid[u] == STALE:
                        kids = nxt[u]
                        kid[u] = max(kids, key=lambda k: (count[kids[k]], -k))
                    t = kid[u]
                    w = nxt[u][t]
                    prob *= count[w] / count[u]
                    if prob < min_prob:
                        break
                    tokens.append(t)
                    score += prob
                    u = w
                if score > best[0]:
                    best = (score, tokens)
            v = up
        return best


class SuffixSpeculator:
    """Proposes a draft per request from its own tokens and from earlier responses.

    Args:
        num_speculative_tokens: draft length at most.
        max_depth: the longest context tail matched.
        min_prob: a draft stops before a token whose estimated probability falls below it.
        max_batch: no drafts in a step of more requests, running and waiting (verification would then cost
            more than it saves).
        max_cached: finished responses kept in the global index (``0`` disables it). A response that ends while
            the engine is too busy to draft is not kept: indexing it costs host time (about 1 ms per 500 tokens)
            in steps that the host bounds.
        min_gain: a step drafts only if its drafts are expected to add at least this many tokens per running
            request (a draft's score is the sum of its tokens' estimated probabilities), since it gives up the
            engine's overlap of host and GPU work: where the host's part of a step is as long as the GPU's (a
            135M model), a drafting step costs up to twice a plain one.
    """

    def __init__(self, num_speculative_tokens: int = 16, max_batch: int = 32, max_depth: int = 64,
                 min_prob: float = 0.1, max_cached: int = 1024, min_gain: float = 0.5) -> None:  # fmt: skip
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        if not 0 < min_prob <= 1:
            raise ValueError(f"min_prob must be in (0, 1], got {min_prob}")
        if min_gain < 0:
            raise ValueError(f"min_gain must be >= 0, got {min_gain}")
        self.num_speculative_tokens, self.max_depth, self.min_prob = num_speculative_tokens, max_depth, min_prob
        self.max_cached, self.max_batch, self.min_gain = max_cached, max_batch, min_gain
        self.local: dict[int, SuffixIndex] = {}
        self.responses = SuffixIndex()
        self.cached: deque[int] = deque()
        self.matched: dict[int, tuple[int, int, int, int]] = {}  # key -> the index version, tokens seen, match
        self.busy = False  # the latest step had more than max_batch requests
        self.wait, self.backoff = 0, 1  # steps until wants looks again, after drafts that were not worth it

    def wants(self, scheduler: Scheduler, in_flight: bool) -> bool:
        """Whether the next step should draft, giving up the engine's overlapped loop for it: not in a step of
        more than ``max_batch`` requests, nor while a step is in flight unless the drafts of the tokens read so far
        (all but the one in flight) are worth it (``min_gain``). Drafts that were not worth it are looked for again
        after 1, 2, 4 ... 16 steps, so a batch that gains nothing does not pay for the search every step. Records
        whether the step is over ``max_batch`` (:meth:`finish` reads it)."""
        self.busy = min(len(scheduler.running) + len(scheduler.waiting), scheduler.max_num_seqs) > self.max_batch
        if self.busy or not in_flight:
            return not self.busy
        if self.wait:
            self.wait -= 1
            return False
        gain = sum(self._best(s.id, s.prompt, s.output, self.num_speculative_tokens)[0]
                   for s in scheduler.running if s.output)  # fmt: skip
        return self._worth(gain, len(scheduler.running))

    def _worth(self, gain: float, batch: int) -> bool:
        if gain >= self.min_gain * batch:
            self.backoff = 1
            return True
        self.wait, self.backoff = self.backoff, min(2 * self.backoff, 16)
        return False

    def draft(self, running: list[Sequence], max_context: int, max_rows: int | None = None) -> bool:
        """Set the draft of every running request, and say whether any got one: none while it prefills;
        never past ``max_new_tokens`` (the draft and the token after it) or the model's context; none at all
        where they are not worth the overlap (``min_gain``). ``max_rows``: the largest decode step that replays
        a CUDA graph; drafts are cut to keep the step within it, since one row more runs the step eagerly (at
        batch 64 on an H200: 4.7-8.1x the cost of a decode step)."""
        per, gain = draft_limit(len(running), self.num_speculative_tokens, max_rows), 0.0
        for seq in running:
            left = min(seq.params.max_new_tokens - len(seq.output) - 1, max_context - seq.num_tokens, per)
            score, seq.draft = self._best(seq.id, seq.prompt, seq.output, left) if seq.pending == 1 else (0.0, [])
            gain += score
        if not self._worth(gain, len(running)):
            for seq in running:
                seq.draft = []
        return any(seq.draft for seq in running)

    def propose(self, key: int, prompt: list[int], output: list[int], limit: int) -> list[int]:
        """Draft at most ``limit`` tokens to follow the request's ``prompt + output``."""
        return self._best(key, prompt, output, limit)[1]

    def _best(self, key: int, prompt: list[int], output: list[int], limit: int) -> tuple[float, list[int]]:
        """:meth:`propose`'s draft and its score: the expected number of its tokens the target accepts."""
        if limit < 1:
            return 0.0, []
        local = self.local.get(key) or self.local.setdefault(key, SuffixIndex())
        local.extend(0, _tokens_from(prompt, output, len(local.ends.get(0, ()))))
        limit = min(limit, self.num_speculative_tokens)
        best = local.draft(local.ends[0][-1], self.max_depth, limit, self.min_prob, (0.0, []))
        if self.cached:
            index, n = self.responses, len(prompt) + len(output)
            version, seen, v, m = self.matched.get(key, (-1, 0, 0, 0))
            if version != index.version:  # the index changed: match the tail afresh
                seen, v, m = max(n - self.max_depth, 0), 0, 0
            v, m = index.match(_tokens_from(prompt, output, seen), v, m)
            self.matched[key] = (index.version, n, v, m)
            best = index.draft(v, min(m, self.max_depth), limit, self.min_prob, best)
        return best

    def finish(self, key: int, output: list[int]) -> None:
        """A request ended: drop its own index, keep its response for later requests."""
        self.local.pop(key, None)
        self.matched.pop(key, None)
        if self.max_cached and output and not self.busy:
            self.responses.extend(key, output)
            self.cached.append(key)
            if len(self.cached) > self.max_cached:
                self.responses.remove(self.cached.popleft())


def verify(rows: list[Sequence], tokens: list[int], scheduler: Scheduler) -> tuple[list, int, int]:
    """Each request's first row and new tokens, from the tokens chosen for its rows (one per row); and the
    draft tokens verified and accepted in all.

    A draft of ``k`` tokens ran as ``k + 1`` rows: its tokens hold up to the first that differs from the
    token the target chose at that position (the argmax, or a sample: either way the output keeps the
    target's distribution), and that chosen token follows. Rejected tokens give up their cache slots.
    """
    out, drafted, accepted, i = [], 0, 0, 0
    while i < len(rows):
        seq = rows[i]
        k, chosen = len(seq.draft), tokens[i : i + len(seq.draft) + 1]
        j = next((j for j in range(k) if seq.draft[j] != chosen[j]), k)
        if k:
            scheduler.rollback(seq, j)
        out.append((seq, i, chosen[: j + 1]))
        drafted, accepted, i = drafted + k, accepted + j, i + k + 1
    return out, drafted, accepted


def draft_limit(batch: int, k: int, max_rows: int | None) -> int:
    """Draft tokens per request that keep a verify step of ``batch`` requests within ``max_rows`` rows."""
    return k if max_rows is None or batch * (k + 1) <= max_rows else max_rows // batch - 1


def speculator(speculative: str | None, num_speculative_tokens: int, max_batch: int) -> SuffixSpeculator | None:
    """The engine's speculator for ``speculative`` (``None``: no speculation)."""
    if speculative not in SPECULATIVE:
        raise ValueError(f"unknown speculative={speculative!r}: use 'suffix' (SuffixDecoding: drafts from the prompt "
                         f"and earlier responses) or None")
    return speculative and SuffixSpeculator(num_speculative_tokens, max_batch)


def _tokens_from(prompt: list[int], output: list[int], start: int) -> list[int]:
    """``(prompt + output)[start:]`` without copying the whole context."""
    return prompt[start:] + output if start < len(prompt) else output[start - len(prompt) :]
