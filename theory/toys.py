"""Exact toy problems for the theory suite (problem builders and enumeration only).

Nothing here is a formula of the paper: every loss, reward, entropy, estimator and closed form comes
from `maxent_rlhf.objectives`. These helpers only build problems (reward tables, policies, the
enumerated sequence space of a tiny autoregressive model) and take exact expectations by summing over
every outcome.

- `Bandit`: the contextual bandit of Sec. 3.2 — a few prompts x, a few responses y, a reward table
  r[x, y]; policies are softmax tables pi(y|x) = softmax(logits[x])[y].
- `ARToy` + `ARPolicy`: responses are token sequences over a vocabulary of V tokens (token 0 = EOS)
  of at most T tokens; a response ends at its first EOS (kept, as in the paper's tooling) or after T
  tokens. Every response is enumerated, so pi(y|x) = prod_t pi(y_t | y_<t) is an exact distribution
  over a finite set, with variable lengths |y| (so length normalisation is not trivial).
  `ARPolicy` is a small parametric policy (embedding of the prefix -> tanh -> logits) so that
  grad_theta log pi(y) is a nontrivial function of the sequence.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from maxent_rlhf import objectives

DTYPE = torch.float64
EOS = 0


# --------------------------------------------------------------------------------------------------
# enumeration helpers
# --------------------------------------------------------------------------------------------------
def expectation(logprobs: torch.Tensor, values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Exact E_{y ~ p}[values(y)] = sum_y p(y) values(y) over an enumerated outcome axis.

    Outcomes with p = 0 contribute 0 even where `values` is infinite (0 * log 0 = 0 convention).
    `values` may have extra trailing dimensions after `dim` (e.g. a gradient vector per outcome).
    """
    p = logprobs.exp()
    while p.dim() < values.dim():
        p = p.unsqueeze(-1)
    term = torch.where(p > 0, p * values, torch.zeros_like(values))
    return term.sum(dim)


def all_rankings(k: int) -> torch.Tensor:
    """Every permutation of range(k) as a LongTensor [k!, k] (rank order, best first)."""
    return torch.tensor(list(itertools.permutations(range(k))), dtype=torch.long)


def all_tuples(n: int, k: int) -> torch.Tensor:
    """Every ordered k-tuple of outcomes in range(n): LongTensor [n**k, k] (i.i.d. draws of k samples)."""
    return torch.tensor(list(itertools.product(range(n), repeat=k)), dtype=torch.long)


def categorical(logprobs: torch.Tensor) -> torch.distributions.Categorical:
    """torch's own Categorical, used as an independent reference for KL and entropy."""
    return torch.distributions.Categorical(logits=logprobs)


# --------------------------------------------------------------------------------------------------
# contextual bandit
# --------------------------------------------------------------------------------------------------
@dataclass
class Bandit:
    """Prompts x in range(X), responses y in range(Y), reward table r[x, y]."""

    rewards: torch.Tensor  # [X, Y] float64

    @property
    def num_prompts(self) -> int:
        return self.rewards.shape[0]

    @property
    def num_responses(self) -> int:
        return self.rewards.shape[1]

    def policy_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax-table policy: log pi(y|x) = log_softmax(logits[x])[y]. [X, Y] -> [X, Y]."""
        if logits.shape != self.rewards.shape:
            raise ValueError(f"`logits` has shape {tuple(logits.shape)}, expected {tuple(self.rewards.shape)}")
        return torch.log_softmax(logits, dim=-1)

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every ordered pair (x, i, j) with i != j, as three LongTensors (prompt, first, second)."""
        x, i, j = zip(
            *[(x, i, j) for x in range(self.num_prompts) for i in range(self.num_responses)
              for j in range(self.num_responses) if i != j]
        )
        return torch.tensor(x), torch.tensor(i), torch.tensor(j)


def make_bandit(rewards: torch.Tensor) -> Bandit:
    rewards = torch.as_tensor(rewards, dtype=DTYPE)
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"`rewards` must be [prompts, responses >= 2], got {tuple(rewards.shape)}")
    return Bandit(rewards)


# --------------------------------------------------------------------------------------------------
# tiny autoregressive policy, every response enumerable
# --------------------------------------------------------------------------------------------------
@dataclass
class ARToy:
    """All responses over vocabulary range(V) (EOS = 0) of at most T tokens.

    sequences: [N, T] labels, padded with EOS after the end (padding is masked out);
    mask: [N, T] 1.0 on real response tokens (the final EOS included); lengths: [N] = |y|.
    """

    vocab_size: int
    max_len: int
    sequences: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor

    @property
    def num_sequences(self) -> int:
        return self.sequences.shape[0]


def make_ar_toy(vocab_size: int = 3, max_len: int = 3) -> ARToy:
    """Enumerate every response: for L = 1..T, L - 1 non-EOS tokens then EOS; plus the T-token
    responses with no EOS (cut at the length limit). N = sum_{L=1}^{T} (V-1)^(L-1) + (V-1)^T."""
    if vocab_size < 2 or max_len < 1:
        raise ValueError(f"need vocab_size >= 2 and max_len >= 1, got {vocab_size}, {max_len}")
    words = range(1, vocab_size)
    seqs, lens = [], []
    for length in range(1, max_len + 1):
        for body in itertools.product(words, repeat=length - 1):
            seqs.append(list(body) + [EOS] + [EOS] * (max_len - length))
            lens.append(length)
    for body in itertools.product(words, repeat=max_len):
        seqs.append(list(body))
        lens.append(max_len)
    sequences = torch.tensor(seqs, dtype=torch.long)
    lengths = torch.tensor(lens, dtype=torch.long)
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).to(DTYPE)
    return ARToy(vocab_size, max_len, sequences, mask, lengths)


class ARPolicy(torch.nn.Module):
    """pi_theta(y_t | y_<t) = softmax(W tanh(E_bos + sum_{s<t} E[y_s] + P[t]) + b + U[y_{t-1}]).

    A small but genuinely parametric policy: parameters are shared across prefixes, so
    grad_theta log pi(y) differs from sequence to sequence in a nontrivial way. float64.
    """

    def __init__(self, vocab_size: int, max_len: int, hidden: int = 3, seed: int = 0, scale: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def p(*shape):
            return torch.nn.Parameter(scale * torch.randn(*shape, generator=g, dtype=DTYPE))

        self.vocab_size, self.max_len = vocab_size, max_len
        self.embed = p(vocab_size + 1, hidden)  # row V = BOS
        self.pos = p(max_len, hidden)
        self.out = p(hidden, vocab_size)
        self.bias = p(vocab_size)
        self.bigram = p(vocab_size + 1, vocab_size)

    def logits(self, sequences: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [N, T, V]: logits[:, t] is the prediction for sequences[:, t]."""
        n, t = sequences.shape
        bos = torch.full((n, 1), self.vocab_size, dtype=torch.long)
        prev = torch.cat([bos, sequences[:, :-1]], dim=1)  # token before position t (BOS at t = 0)
        context = torch.cumsum(self.embed[prev], dim=1)  # bag of the prefix (BOS included)
        h = torch.tanh(context + self.pos[:t])
        return h @ self.out + self.bias + self.bigram[prev]

    def sequence_logprobs(self, toy: ARToy, average: bool = False) -> torch.Tensor:
        """log pi(y) (or the per-token mean) of every enumerated response, via objectives.sequence_logprobs."""
        return objectives.sequence_logprobs(self.logits(toy.sequences), toy.sequences, toy.mask, average=average)

    def flat_grad(self, scalar: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        grads = torch.autograd.grad(scalar, list(self.parameters()), create_graph=create_graph, retain_graph=True)
        return torch.cat([g.reshape(-1) for g in grads])

    def per_sequence_grads(self, values: torch.Tensor) -> torch.Tensor:
        """Stack grad_theta values[n] for every n: [N, num_params] (the Jacobian, row by row)."""
        return torch.stack([self.flat_grad(v) for v in values])
