"""Every formula of the suite, once, as pure tensor functions.

No models, no I/O: the trainers (`train_rloo.py`, `train_offline.py`), the judge and the theory tests
(`theory/`) import these and nothing else re-implements them. Equation numbers refer to
"Failure Modes of Maximum Entropy RLHF" (main text Eqs. 1-7, appendix C Eqs. 8-12).

Notation (as in docs/sources.md section 3): S = summed response log-prob log pi(y|x), A = S / |y| (per-token
mean), rho = S - S_ref, h = rho_w - rho_l. All losses return *per-example* losses (the caller takes the
mean) together with the implicit rewards a trainer logs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

DEFAULT_CHUNK_SIZE = 1024  # rows of [*, vocab] logits processed at once by the memory-lean functions


# --------------------------------------------------------------------------------------------------
# argument checks (bad input raises a ValueError that names the argument)
# --------------------------------------------------------------------------------------------------
def _check_same_shape(**tensors: Tensor) -> None:
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.shape != t0.shape:
            raise ValueError(
                f"`{name}` has shape {tuple(t.shape)} but `{name0}` has shape {tuple(t0.shape)}; "
                "they must match"
            )


def _check_pair(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
) -> None:
    """The opening check of every pairwise loss: one value per example for each log-prob given."""
    given = dict(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    _check_same_shape(**{name: t for name, t in given.items() if t is not None})


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"`{name}` must be > 0, got {value}")


def _check_mask(name: str, mask: Tensor) -> None:
    if mask.numel() == 0 or not bool(mask.to(torch.bool).any()):
        raise ValueError(f"`{name}` selects no token: every sequence would have an empty response")


# --------------------------------------------------------------------------------------------------
# log-probabilities, entropy, KL estimators
# --------------------------------------------------------------------------------------------------
def _row_chunks(x: Tensor, chunk_size: int):
    """Yield [rows, V] pieces of x ([..., V]) in row-major order without copying x.

    `x.reshape(-1, V)` silently copies the whole tensor when x is a non-viewable slice such as the
    usual shifted `logits[:, :-1]`; then we walk the leading dimension instead (views only).
    """
    vocab = x.shape[-1]
    try:
        flat = x.view(-1, vocab)
    except RuntimeError:
        for sub in x.unbind(0):
            yield from _row_chunks(sub, chunk_size)
        return
    for start in range(0, flat.shape[0], chunk_size):
        yield flat[start : start + chunk_size]


class _LeanTokenLogprobs(torch.autograd.Function):
    """Chunked logit[label] / T - logsumexp(logits / T) with a hand-written, equally chunked backward.

    Plain autograd through the chunk loop costs more memory than the naive form: in backward each chunk's
    slice creates its own zero-filled, logits-sized gradient before they are summed.
    Here forward saves only the logits (no copy); backward writes (onehot(label) - softmax(logits / T))
    * grad / T into a single gradient buffer chunk by chunk. Each chunk uses the fused row-wise
    log_softmax / softmax kernels (faster than logsumexp on CPU, and bitwise equal to the naive form).
    """

    @staticmethod
    def forward(ctx, logits, flat_labels, temperature, chunk_size, out_dtype):
        pieces = []
        start = 0
        for chunk in _row_chunks(logits, chunk_size):
            rows = chunk.shape[0]
            z = chunk.to(out_dtype)
            if temperature != 1.0:
                z = z / temperature
            # a [rows, V] transient only: logit[label] - logsumexp(row), via the fused kernel
            logp = torch.log_softmax(z, dim=-1)
            pieces.append(logp.gather(-1, flat_labels[start : start + rows, None]).squeeze(-1))
            del logp, z
            start += rows
        ctx.save_for_backward(logits, flat_labels)
        ctx.temperature, ctx.chunk_size, ctx.out_dtype = temperature, chunk_size, out_dtype
        return torch.cat(pieces)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, flat_labels = ctx.saved_tensors
        temperature = ctx.temperature
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # contiguous
        grad_flat = grad.view(-1, logits.shape[-1])
        g_all = grad_out.to(ctx.out_dtype) / temperature
        start = 0
        for chunk in _row_chunks(logits, ctx.chunk_size):
            rows = chunk.shape[0]
            z = chunk.to(ctx.out_dtype)
            if temperature != 1.0:
                z = z / temperature
            g = g_all[start : start + rows, None]
            probs = torch.softmax(z, dim=-1)
            del z
            probs.mul_(-g).scatter_add_(-1, flat_labels[start : start + rows, None], g)
            grad_flat[start : start + rows].copy_(probs)
            start += rows
        return grad, None, None, None, None


def token_logprobs(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Tensor:
    """log softmax(logits / T)[label] for every position, without a full [B, T, V] log-softmax.

    logits: [..., V], labels: [...] (same leading shape). Returns [...] in the dtype of `logits`
    (upcast to float32 when logits are half precision, where logsumexp would lose digits).

    Memory: the naive `log_softmax(logits).gather(...)` materialises a second [B, T, V] tensor (and keeps
    it for backward). Here each chunk of `chunk_size` rows computes `logit[label] - logsumexp(row)`, so the
    transient is [chunk_size, V]; nothing logits-sized is kept for backward, whose only logits-sized
    allocation is the gradient itself (see `_LeanTokenLogprobs`). A non-viewable slice such as
    `logits[:, :-1]` is walked without a copy. First-order gradients only (double backward raises).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"`labels` has shape {tuple(labels.shape)} but `logits` has leading shape "
            f"{tuple(logits.shape[:-1])}; they must match"
        )
    _check_positive("temperature", temperature)
    _check_positive("chunk_size", chunk_size)
    flat_labels = labels.reshape(-1).long()
    out_dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    if labels.numel() == 0:
        return logits.new_zeros(labels.shape, dtype=out_dtype)
    out = _LeanTokenLogprobs.apply(logits, flat_labels, float(temperature), int(chunk_size), out_dtype)
    return out.reshape(labels.shape)


def masked_sum(values: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    return (values * mask.to(values.dtype)).sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean over the positions where mask is 1 (over everything when dim is None)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp_min(1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
    average: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Sequence log-probability S = sum_t log pi(y_t | x, y_<t) over the response mask ([B, T] -> [B]).

    `average=True` gives the length-normalised A = S / |y| used by SimPO (Eq. 7 and Sec. 2.3).
    `logits[:, t]` must be the prediction for `labels[:, t]` (the caller shifts).
    """
    _check_same_shape(labels=labels, mask=mask)
    _check_mask("mask", mask)
    logps = token_logprobs(logits, labels, temperature=temperature, chunk_size=chunk_size)
    total = masked_sum(logps, mask)
    if average:
        return total / mask.to(total.dtype).sum(-1).clamp_min(1.0)
    return total


def token_entropy(
    logits: Tensor, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Tensor:
    """Exact entropy of softmax(logits / T) at every position: H = logsumexp(z) - sum p z. [..., V] -> [...]

    This is the true token entropy from the logits (not -log p of the sampled token), chunked like
    `token_logprobs`. Mask it with `masked_mean` over real response tokens.
    """
    _check_positive("temperature", temperature)
    _check_positive("chunk_size", chunk_size)
    out_dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    pieces = []
    for z in _row_chunks(logits, chunk_size):
        z = z.to(out_dtype)
        if temperature != 1.0:
            z = z / temperature
        lse = torch.logsumexp(z, dim=-1)
        p = torch.softmax(z, dim=-1)
        # masked (-inf) logits have p = 0 and contribute 0 (0 * log 0 = 0), not 0 * -inf = nan
        z = torch.where(p > 0, z, torch.zeros_like(z))
        pieces.append(lse - (p * z).sum(-1))
    if not pieces:
        return logits.new_zeros(logits.shape[:-1], dtype=out_dtype)
    return torch.cat(pieces).reshape(logits.shape[:-1])


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman's k1/k2/k3).

    With d = log pi_ref - log pi on a sampled token:
      k1 = -d               (unbiased, can be negative on a batch),
      k2 = d^2 / 2          (biased, low variance),
      k3 = exp(d) - 1 - d   (unbiased and never negative).
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    d = ref_logprobs - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.pow(2)
    if estimator == "k3":
        return torch.expm1(d) - d
    raise ValueError(f"`estimator` must be one of 'k1', 'k2', 'k3', got {estimator!r}")


# --------------------------------------------------------------------------------------------------
# maximum-entropy RL in closed form (Sec. 3, appendix C): used by the theory suite and the toy lab
# --------------------------------------------------------------------------------------------------
def maxent_optimal_policy(rewards: Tensor, alpha: float) -> Tensor:
    """pi*(y|x) = exp(r(x,y) / alpha) / Z(x) (Eq. 3 / Eq. 8). rewards: [..., Y] -> probabilities [..., Y]."""
    _check_positive("alpha", alpha)
    return torch.softmax(rewards / alpha, dim=-1)


def maxent_log_partition(rewards: Tensor, alpha: float) -> Tensor:
    """log Z(x) = log sum_y exp(r(x,y) / alpha) (appendix C.1). [..., Y] -> [...]."""
    _check_positive("alpha", alpha)
    return torch.logsumexp(rewards / alpha, dim=-1)


def maxent_objective(policy_logprobs: Tensor, rewards: Tensor, alpha: float) -> Tensor:
    """J(pi) = E_{y~pi}[r(x,y)] + alpha H(pi(.|x)) = E_pi[r - alpha log pi] (Eq. 2). [..., Y] -> [...].

    Zero-probability responses contribute nothing (0 * log 0 = 0).
    """
    _check_same_shape(policy_logprobs=policy_logprobs, rewards=rewards)
    probs = policy_logprobs.exp()
    term = torch.where(probs > 0, probs * (rewards - alpha * policy_logprobs), torch.zeros_like(probs))
    return term.sum(-1)


def reward_from_policy(policy_logprobs: Tensor, alpha: float, log_partition: Tensor | float = 0.0) -> Tensor:
    """Eq. 4: r(x,y) = alpha log pi_r(y|x) + alpha log Z(x).

    With log_partition = 0 this is the representative of the reward's equivalence class that
    Theorem 1 (appendix C.6) picks: r' = alpha log pi.
    """
    if isinstance(log_partition, Tensor):
        log_partition = log_partition.unsqueeze(-1)
    return alpha * policy_logprobs + alpha * log_partition


def bradley_terry_probability(reward_1: Tensor, reward_2: Tensor) -> Tensor:
    """p(y1 > y2 | x) = sigma(r1 - r2) (Eq. 1 / Eq. 9)."""
    return torch.sigmoid(reward_1 - reward_2)


def plackett_luce_log_likelihood(ranked_scores: Tensor) -> Tensor:
    """log p(tau) = sum_k [s_k - log sum_{j>=k} exp(s_j)] (Eq. 11 / Eq. 12).

    ranked_scores: [..., K], position k holds the score of the response ranked k-th (best first).
    Returns [...]. The suffix log-sum-exp is a reversed logcumsumexp, stable for any scale.
    """
    if ranked_scores.shape[-1] < 2:
        raise ValueError(f"`ranked_scores` needs K >= 2 responses, got K = {ranked_scores.shape[-1]}")
    suffix_lse = torch.logcumsumexp(ranked_scores.flip(-1), dim=-1).flip(-1)
    return (ranked_scores - suffix_lse).sum(-1)


# --------------------------------------------------------------------------------------------------
# offline losses
# --------------------------------------------------------------------------------------------------
@dataclass
class PairwiseLossOutput:
    """Per-example losses and the implicit rewards the trainers log (`rewards/chosen`, ...)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor

    @property
    def margins(self) -> Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracies(self) -> Tensor:
        return (self.chosen_rewards > self.rejected_rewards).to(self.losses.dtype)


def _lengths(name: str, lengths: Tensor, like: Tensor) -> Tensor:
    _check_same_shape(**{"logps": like, name: lengths})
    lengths = lengths.to(like.dtype)
    if bool((lengths <= 0).any()):
        raise ValueError(f"`{name}` must be >= 1 for every example (an empty response has no log-prob)")
    return lengths


def sft_loss(sequence_logps: Tensor, lengths: Tensor) -> Tensor:
    """Per-example negative log-likelihood per response token: -S / |y|."""
    return -sequence_logps / _lengths("lengths", lengths, sequence_logps)


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> PairwiseLossOutput:
    """Reward-model loss -log sigma(r(x,y_w) - r(x,y_l)) (Sec. 2.1, Eq. 1)."""
    _check_same_shape(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    losses = -F.logsigmoid(chosen_scores - rejected_scores)
    return PairwiseLossOutput(losses, chosen_scores.detach(), rejected_scores.detach())


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> PairwiseLossOutput:
    """DPO (Sec. 2.2): -log sigma(beta * h), h = (S_w - S_w^ref) - (S_l - S_l^ref)."""
    _check_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_positive("beta", beta)
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(chosen - rejected)
    return PairwiseLossOutput(losses, chosen.detach(), rejected.detach())


def simpo_rewards(logps: Tensor, lengths: Tensor, beta: float, length_normalize: bool = True) -> Tensor:
    """SimPO's implicit reward r = (beta / |y|) log pi(y|x) (Sec. 2.3); alpha log pi without normalisation
    (Eq. 4 with Z dropped, appendix C.2)."""
    if length_normalize:
        return beta * logps / _lengths("lengths", lengths, logps)
    return beta * logps


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
    gamma: float = 0.0,
    length_normalize: bool = True,
) -> PairwiseLossOutput:
    """SimPO: -log sigma(beta A_w - beta A_l - gamma) (Sec. 2.3, Sec. 3.2).

    `gamma` is the absolute target margin (TRL's `simpo_gamma`; the official repo's ratio gamma/beta
    times beta). With `length_normalize=False` and gamma = 0 this is exactly the maximum-entropy
    Bradley-Terry likelihood of appendix C.2: -log sigma(alpha log pi(y_w) - alpha log pi(y_l)), alpha = beta.
    """
    _check_pair(policy_chosen_logps, policy_rejected_logps)
    _check_positive("beta", beta)
    if length_normalize:  # validate here so the error names the caller's argument
        _lengths("chosen_lengths", chosen_lengths, policy_chosen_logps)
        _lengths("rejected_lengths", rejected_lengths, policy_rejected_logps)
    chosen = simpo_rewards(policy_chosen_logps, chosen_lengths, beta, length_normalize)
    rejected = simpo_rewards(policy_rejected_logps, rejected_lengths, beta, length_normalize)
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return PairwiseLossOutput(losses, chosen.detach(), rejected.detach())


def simpo_plackett_luce_loss(
    ranked_logps: Tensor,
    ranked_lengths: Tensor,
    beta: float,
    gamma: float = 0.0,
    length_normalize: bool = True,
) -> Tensor:
    """SimPO over K ranked responses under Plackett-Luce (appendix C.3, Eq. 12): -log p(tau).

    ranked_logps, ranked_lengths: [B, K], column k holds the response ranked k-th (best first).
    s_k = beta * A_k (or beta * S_k). The margin enters as s_k - gamma * (K - 1 - k), so that with K = 2
    the loss is exactly `simpo_loss` with margin gamma. Returns per-example losses [B].
    """
    _check_same_shape(ranked_logps=ranked_logps, ranked_lengths=ranked_lengths)
    if ranked_logps.dim() != 2 or ranked_logps.shape[-1] < 2:
        raise ValueError(f"`ranked_logps` must be [batch, K] with K >= 2, got {tuple(ranked_logps.shape)}")
    _check_positive("beta", beta)
    if length_normalize:
        _lengths("ranked_lengths", ranked_lengths, ranked_logps)
    scores = simpo_rewards(ranked_logps, ranked_lengths, beta, length_normalize)
    k = scores.shape[-1]
    offsets = gamma * torch.arange(k - 1, -1, -1, dtype=scores.dtype, device=scores.device)
    return -plackett_luce_log_likelihood(scores - offsets)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
) -> PairwiseLossOutput:
    """IPO: (h_bar - 1 / (2 beta))^2, h_bar the difference of per-token-averaged log-ratios."""
    _check_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_positive("beta", beta)
    rho_w = (policy_chosen_logps - ref_chosen_logps) / _lengths("chosen_lengths", chosen_lengths, policy_chosen_logps)
    rho_l = (policy_rejected_logps - ref_rejected_logps) / _lengths(
        "rejected_lengths", rejected_lengths, policy_rejected_logps
    )
    losses = (rho_w - rho_l - 1.0 / (2.0 * beta)).pow(2)
    return PairwiseLossOutput(losses, (beta * rho_w).detach(), (beta * rho_l).detach())


def cpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    beta: float,
    nll_coef: float = 1.0,
) -> PairwiseLossOutput:
    """CPO: -log sigma(beta (S_w - S_l)) + nll_coef * NLL(y_w), NLL per token (set nll_coef = 0 to drop it)."""
    _check_pair(policy_chosen_logps, policy_rejected_logps)
    _check_positive("beta", beta)
    _lengths("chosen_lengths", chosen_lengths, policy_chosen_logps)
    chosen = beta * policy_chosen_logps
    rejected = beta * policy_rejected_logps
    losses = -F.logsigmoid(chosen - rejected) + nll_coef * sft_loss(policy_chosen_logps, chosen_lengths)
    return PairwiseLossOutput(losses, chosen.detach(), rejected.detach())


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    lam: float = 0.1,
) -> PairwiseLossOutput:
    """ORPO: NLL(y_w) - lam * log sigma(log_odds), log_odds = (A_w - A_l) - [log(1-e^{A_w}) - log(1-e^{A_l})].

    Rewards logged as lam * A (as TRL does).
    """
    _check_pair(policy_chosen_logps, policy_rejected_logps)
    a_w = policy_chosen_logps / _lengths("chosen_lengths", chosen_lengths, policy_chosen_logps)
    a_l = policy_rejected_logps / _lengths("rejected_lengths", rejected_lengths, policy_rejected_logps)
    # A is a mean log-prob and so <= 0; clamp a hair below 0 so log(1 - e^A) stays finite.
    a_w_c, a_l_c = a_w.clamp(max=-1e-6), a_l.clamp(max=-1e-6)
    log_odds = (a_w_c - a_l_c) - (_log1mexp(a_w_c) - _log1mexp(a_l_c))
    losses = -a_w - lam * F.logsigmoid(log_odds)
    return PairwiseLossOutput(losses, (lam * a_w).detach(), (lam * a_l).detach())


def slic_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    delta: float = 1.0,
    nll_coef: float = 0.1,
) -> PairwiseLossOutput:
    """SLiC-HF calibration: max(0, delta - S_w + S_l) + nll_coef * NLL(y_w) (NLL per token)."""
    _check_pair(policy_chosen_logps, policy_rejected_logps)
    _lengths("chosen_lengths", chosen_lengths, policy_chosen_logps)
    hinge = torch.clamp(delta - policy_chosen_logps + policy_rejected_logps, min=0.0)
    losses = hinge + nll_coef * sft_loss(policy_chosen_logps, chosen_lengths)
    return PairwiseLossOutput(losses, policy_chosen_logps.detach(), policy_rejected_logps.detach())


CHIPO_MAX_LOGRATIO = 30.0  # exp(30) ~ 1e13: far past any clip; keeps e^rho finite in float32


def chipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    reward_clip: float = 1.0,
) -> PairwiseLossOutput:
    """chi-PO (Huang et al. 2025): link phi(z) = z + log z on the density ratio z = pi / pi_ref,
    r = beta (e^rho + rho); loss -log sigma(clip(r_w - r_l, -2 R, 2 R)) with R = `reward_clip`.

    No overflow: e^rho_w - e^rho_l is computed as e^m (e^(rho_w - m) - e^(rho_l - m)) with
    m = max(rho_w, rho_l) and the factor e^m capped at e^CHIPO_MAX_LOGRATIO. Below the cap this is exact;
    above it the difference keeps its sign and is ~1e13 * beta in size, so the clipped logit is
    saturated whenever the two log-ratios differ noticeably (it is exact after clipping in practice).
    The logged rewards use rho clamped at CHIPO_MAX_LOGRATIO.
    """
    _check_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_positive("beta", beta)
    _check_positive("reward_clip", reward_clip)
    rho_w = policy_chosen_logps - ref_chosen_logps
    rho_l = policy_rejected_logps - ref_rejected_logps
    m = torch.maximum(rho_w, rho_l)
    exp_diff = m.clamp(max=CHIPO_MAX_LOGRATIO).exp() * ((rho_w - m).exp() - (rho_l - m).exp())
    logits = torch.clamp(beta * (exp_diff + rho_w - rho_l), -2.0 * reward_clip, 2.0 * reward_clip)
    losses = -F.logsigmoid(logits)
    rho_w_c, rho_l_c = rho_w.clamp(max=CHIPO_MAX_LOGRATIO), rho_l.clamp(max=CHIPO_MAX_LOGRATIO)
    chosen = beta * (rho_w_c.exp() + rho_w_c)
    rejected = beta * (rho_l_c.exp() + rho_l_c)
    return PairwiseLossOutput(losses, chosen.detach(), rejected.detach())


# --------------------------------------------------------------------------------------------------
# the preference losses by name: one dispatch for the offline and the online trainer
# --------------------------------------------------------------------------------------------------
PREFERENCE_LOSSES = ("dpo", "ipo", "chipo", "simpo", "cpo", "orpo", "slic", "simpo_pl")
REFERENCE_LOSSES = ("dpo", "ipo", "chipo")  # need log pi_ref


@dataclass(frozen=True)
class PreferenceLossParams:
    """The hyper-parameters of the preference losses (the trainers' config fields of the same names)."""

    beta: float = 0.1  # dpo / ipo / chipo / simpo / simpo_pl / cpo
    simpo_gamma: float = 0.5  # simpo / simpo_pl: absolute target margin
    length_normalize: bool = True  # simpo / simpo_pl: A = S / |y|
    cpo_alpha: float = 1.0
    orpo_lambda: float = 0.1
    slic_delta: float = 1.0
    slic_nll_coef: float = 0.1
    chipo_reward_clip: float = 1.0

    @classmethod
    def of(cls, config) -> "PreferenceLossParams":
        """The fields of this class read off any object that has them (a trainer's config)."""
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


def preference_loss(loss_type: str, logps: Tensor, lengths: Tensor, ref_logps: Optional[Tensor],
                    params: PreferenceLossParams) -> PairwiseLossOutput:
    """The preference loss `loss_type` from summed log-probs S and lengths |y|, both [B, K]: chosen / best
    is column 0, rejected / worst column -1 (simpo_pl ranks all K; its logged rewards are best vs worst).
    `ref_logps` [B, K]: the reference's S, required by REFERENCE_LOSSES."""
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"`loss_type` must be one of {PREFERENCE_LOSSES}, got {loss_type!r}")
    if loss_type in REFERENCE_LOSSES and ref_logps is None:
        raise ValueError(f"`ref_logps` is required for loss_type {loss_type!r}")
    p = params
    s_w, s_l, n_w, n_l = logps[:, 0], logps[:, -1], lengths[:, 0], lengths[:, -1]
    if loss_type == "dpo":
        return dpo_loss(s_w, s_l, ref_logps[:, 0], ref_logps[:, 1], p.beta)
    if loss_type == "ipo":
        return ipo_loss(s_w, s_l, ref_logps[:, 0], ref_logps[:, 1], n_w, n_l, p.beta)
    if loss_type == "chipo":
        return chipo_loss(s_w, s_l, ref_logps[:, 0], ref_logps[:, 1], p.beta, p.chipo_reward_clip)
    if loss_type == "simpo":
        return simpo_loss(s_w, s_l, n_w, n_l, p.beta, p.simpo_gamma, p.length_normalize)
    if loss_type == "cpo":
        return cpo_loss(s_w, s_l, n_w, p.beta, p.cpo_alpha)
    if loss_type == "orpo":
        return orpo_loss(s_w, s_l, n_w, n_l, p.orpo_lambda)
    if loss_type == "slic":
        return slic_loss(s_w, s_l, n_w, p.slic_delta, p.slic_nll_coef)
    losses = simpo_plackett_luce_loss(logps, lengths, p.beta, p.simpo_gamma, p.length_normalize)
    rewards = simpo_rewards(logps, lengths, p.beta, p.length_normalize).detach()
    return PairwiseLossOutput(losses, rewards[:, 0], rewards[:, -1])


@dataclass
class PairSelection:
    """Which two of each prompt's k completions the online pairwise loss sees (indices within the group)."""

    chosen: Tensor  # [P] long: the best-scored completion (the first of equal best)
    rejected: Tensor  # [P] long: the worst-scored completion (the first of equal worst)
    valid: Tensor  # [P] bool: best > worst; False is a tie (every completion scored the same): skipped


def best_worst_pairs(scores: Tensor) -> PairSelection:
    """Online pairs (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; here with
    k >= 2 samples): chosen = best, rejected = worst of each prompt's k completions by score.
    scores: [P, k]. A prompt whose best and worst scores are equal has no preference to learn from: its
    pair is marked invalid (the trainer skips it and counts it), never trained on as if ordered."""
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"`scores` must be [num_prompts, k] with k >= 2, got shape {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("`scores` holds a non-finite value: no order to pick a pair from")
    best, worst = scores.argmax(1), scores.argmin(1)  # the first index of equal values (documented torch behaviour)
    valid = scores.gather(1, best[:, None]).squeeze(1) > scores.gather(1, worst[:, None]).squeeze(1)
    return PairSelection(best, worst, valid)


# --------------------------------------------------------------------------------------------------
# online RLOO pieces
# --------------------------------------------------------------------------------------------------
REGULARIZERS = ("kl", "entropy", "none")


@dataclass
class RegularizedReward:
    rewards: Tensor  # r_phi + non_score_reward, the quantity RLOO maximises ("RLHF reward")
    non_score_reward: Tensor  # the regulariser's contribution, per sequence


def missing_eos_penalty(scores: Tensor, contains_eos: Tensor, penalty: float) -> Tensor:
    """score - penalty for every completion that never emitted EOS. [B], [B] -> [B] (float).

    A completion cut at `response_length` before its EOS is not a finished summary, so it is scored lower
    and the policy learns to stop (the "EOS trick" of the TL;DR "N+ implementation details" recipe, in
    the subtractive form of TRL's `missing_eos_penalty`); a penalty of 0 keeps the reward model's score.
    """
    if scores.shape != contains_eos.shape or scores.dim() != 1:
        raise ValueError(f"`scores` {tuple(scores.shape)} and `contains_eos` {tuple(contains_eos.shape)} must be the same [B]")
    return scores.float() - penalty * (~contains_eos.bool()).float()


def regularized_reward(
    scores: Tensor,
    logprobs: Tensor,
    response_mask: Tensor,
    regularizer: str,
    coef: float,
    ref_logprobs: Optional[Tensor] = None,
    length_normalize: bool = False,
) -> RegularizedReward:
    """The sequence reward RLOO maximises, for each regulariser (Sec. 4.1).

    scores: [B] reward-model scores; logprobs, ref_logprobs, response_mask: [B, T] per sampled token.
      kl:      r - beta * sum_t (log pi - log pi_ref)            (Sec. 2.1, Sec. 4.1; k1 estimator)
      entropy: r - alpha * log pi(y|x)                           (Eq. 6)
               r - (alpha / |y|) * log pi(y|x)                   (Eq. 7, length_normalize=True)
               a negative alpha is the paper's minimum-entropy variant (Sec. 4.2.1)
      none:    r
    The entropy term -alpha log pi(y|x) is a one-sample estimate of alpha H(pi(.|x)): its batch mean is
    the "entropy bonus" of Figures 1-2.
    """
    _check_same_shape(logprobs=logprobs, response_mask=response_mask)
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"`scores` has shape {tuple(scores.shape)}, expected ({logprobs.shape[0]},)")
    if regularizer == "kl":
        if ref_logprobs is None:
            raise ValueError("`ref_logprobs` is required for regularizer 'kl'")
        _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
        non_score = -coef * masked_sum(kl_estimate(logprobs, ref_logprobs, "k1"), response_mask)
    elif regularizer == "entropy":
        entropy = sampled_entropy(logprobs, response_mask)  # -log pi(y|x) and -log pi(y|x) / |y|
        if length_normalize:
            if bool((response_mask.sum(-1) <= 0).any()):
                raise ValueError("`response_mask` has an empty response; |y| must be >= 1 to normalise")
            non_score = coef * entropy.per_token
        else:
            non_score = coef * entropy.sequence
    elif regularizer == "none":
        non_score = torch.zeros_like(scores)
    else:
        raise ValueError(f"`regularizer` must be one of {REGULARIZERS}, got {regularizer!r}")
    return RegularizedReward(rewards=scores + non_score, non_score_reward=non_score)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024).

    rewards: [num_prompts, k], the k sampled completions of each prompt. For sample i the baseline is
    the mean of the other k - 1 rewards: A_i = r_i - (sum_j r_j - r_i) / (k - 1) = k / (k - 1) (r_i - mean r).
    """
    if rewards.dim() != 2:
        raise ValueError(f"`rewards` must be [num_prompts, k], got shape {tuple(rewards.shape)}")
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(f"`rewards` needs k >= 2 samples per prompt for a leave-one-out baseline, got k = {k}")
    baseline = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
    return rewards - baseline


def whiten(values: Tensor, mask: Optional[Tensor] = None, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the (masked) entries; shift_mean=False keeps the mean."""
    if mask is None:
        mask = torch.ones_like(values)
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean).pow(2), mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def truncated_importance_weights(trainer_logprobs: Tensor, engine_logprobs: Tensor, response_mask: Tensor,
                                 cap: float, level: str = "sequence") -> Tensor:
    """Truncated importance sampling (TIS) weights of samples drawn by a rollout engine whose log-probs differ
    from the trainer's (vLLM in bf16): w = min(pi_trainer(y) / pi_engine(y), cap), as TRL's
    `vllm_importance_sampling_correction`.

    trainer_logprobs, engine_logprobs, response_mask: [B, T] (the trainer's old log-probs and the engine's of
    the same sampled tokens). level="sequence": [B], w = min(exp(sum_t (trainer - engine)), cap) over real
    tokens; level="token": [B, T], w_t = min(exp(trainer_t - engine_t), cap), 1 on padding. Constants
    (no gradient). Only the top is truncated: a weight below 1 down-weights a sample the engine over-drew.
    """
    _check_same_shape(trainer_logprobs=trainer_logprobs, engine_logprobs=engine_logprobs, response_mask=response_mask)
    _check_positive("cap", cap)
    mask = response_mask.to(torch.float64)
    log_w = (trainer_logprobs.detach().double() - engine_logprobs.detach().double()) * mask
    if level == "sequence":
        log_w = log_w.sum(-1)
    elif level != "token":
        raise ValueError(f"`level` must be 'sequence' or 'token', got {level!r}")
    return torch.clamp(log_w, max=math.log(cap)).exp().to(trainer_logprobs.dtype)


@dataclass
class PolicyLossOutput:
    loss: Tensor  # scalar
    clipfrac: Tensor  # fraction of (sequences|tokens) where the clipped branch is active
    approxkl: Tensor  # 0.5 * mean((new - old log-prob)^2)
    ratio: Tensor  # mean importance ratio


def ppo_clipped_policy_loss(
    new_logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    cliprange: float,
    level: str = "sequence",
    weights: Optional[Tensor] = None,
) -> PolicyLossOutput:
    """Clipped surrogate max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) (Schulman et al. 2017).

    new_logprobs, old_logprobs, response_mask: [B, T]; advantages: [B] (one per sequence).
      level="sequence": rho = exp(sum_t new - sum_t old), the paper's RLOO tooling (TRL's 2024 RLOOTrainer);
      level="token":    rho_t per token with the sequence advantage broadcast, masked token mean.
    `weights` (optional, constants): each sequence's ([B]) or token's ([B, T]) term of the loss is
    multiplied by its weight (`truncated_importance_weights`); clipfrac / approxkl / ratio are unweighted.
    """
    _check_same_shape(new_logprobs=new_logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    if advantages.shape != new_logprobs.shape[:1]:
        raise ValueError(f"`advantages` has shape {tuple(advantages.shape)}, expected ({new_logprobs.shape[0]},)")
    _check_positive("cliprange", cliprange)
    mask = response_mask.to(new_logprobs.dtype)
    if level == "sequence":
        log_ratio = masked_sum(new_logprobs - old_logprobs, mask)
        ratio = log_ratio.exp()
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
        per_seq = torch.max(unclipped, clipped)
        loss = (per_seq if weights is None else per_seq * weights).mean()
        clipfrac = (clipped > unclipped).to(ratio.dtype).mean()
        approxkl = 0.5 * log_ratio.pow(2).mean()
        return PolicyLossOutput(loss, clipfrac.detach(), approxkl.detach(), ratio.mean().detach())
    if level == "token":
        log_ratio = new_logprobs - old_logprobs
        ratio = log_ratio.exp()
        adv = advantages[:, None]
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
        per_token = torch.max(unclipped, clipped)
        loss = masked_mean(per_token if weights is None else per_token * weights, mask)
        clipfrac = masked_mean((clipped > unclipped).to(ratio.dtype), mask)
        approxkl = 0.5 * masked_mean(log_ratio.pow(2), mask)
        return PolicyLossOutput(loss, clipfrac.detach(), approxkl.detach(), masked_mean(ratio, mask).detach())
    raise ValueError(f"`level` must be 'sequence' or 'token', got {level!r}")


# --------------------------------------------------------------------------------------------------
# curves of Figures 1-3 and 10-12: KL between consecutive policies (both directions), sampled entropy
# --------------------------------------------------------------------------------------------------
KL_ESTIMATORS = ("k1", "k3")


def _check_kl_estimator(estimator: str) -> None:
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {KL_ESTIMATORS}, got {estimator!r}")


def kl_old_new_from_old_samples(
    old_logprobs: Tensor, new_logprobs: Tensor, response_mask: Tensor, estimator: str = "k1"
) -> Tensor:
    """KL(pi_old || pi_new) per sequence, from responses sampled from pi_old. [B, T] -> [B].

    The REVERSE of the paper's consecutive-policy curve (Figs. 3, 10-12 plot KL(pi_t || pi_{t-1}), see
    `kl_new_old_from_old_samples`). Here the samples come from the first argument of the KL, so no
    importance weight is needed: the per-token `kl_estimate` (k1 or k3) of log pi_new against log pi_old,
    summed over the real response tokens, is unbiased for the sequence-level KL by the chain rule.
    old_logprobs, new_logprobs: log pi(y_t | x, y_<t) of the sampled tokens before and after the update.
    """
    _check_same_shape(old_logprobs=old_logprobs, new_logprobs=new_logprobs, response_mask=response_mask)
    _check_kl_estimator(estimator)
    return masked_sum(kl_estimate(old_logprobs, new_logprobs, estimator), response_mask)


def kl_new_old_from_old_samples(
    old_logprobs: Tensor, new_logprobs: Tensor, response_mask: Tensor, estimator: str = "k1"
) -> Tensor:
    """KL(pi_new || pi_old) per sequence, from responses sampled from pi_old: the paper's direction
    KL(pi_t || pi_{t-1}) of Figs. 3 (bottom) and 10-12. [B, T] -> [B].

    Derivation. Let w(y) = pi_new(y|x) / pi_old(y|x) = exp(sum_t [new_t - old_t]) over the real tokens of
    y (the sequence importance weight; the prompt's factors cancel). For any g,
    E_old[w g] = sum_y pi_old(y) (pi_new(y) / pi_old(y)) g(y) = E_new[g]. With g = log w:
        KL(pi_new || pi_old) = E_new[log w] = E_old[w log w]                 ("k1": w log w)
    and since E_old[w] = 1, subtracting the zero-mean control variate w - 1 keeps it unbiased:
        KL(pi_new || pi_old) = E_old[w log w - w + 1]                        ("k3")
    whose every term is >= 0 (f(w) = w log w - w + 1 is convex with f(1) = f'(1) = 0). This is Schulman's
    k1 / k3 of the sampled pi_old / pi_new ratio, importance-weighted by w.

    Unbiased for each sequence as long as pi_new puts no mass where pi_old has none (true for softmax
    policies with finite logits), since the identity E_old[w g] = E_new[g] is exact, not asymptotic.

    Variance: the second moment is E_old[w^2 log^2 w] = E_new[w log^2 w], governed by the chi-square /
    Renyi-2 divergence of pi_new from pi_old. w is a product over the response tokens, so log w is a
    sum of T per-token terms and w is roughly log-normal: its variance grows like exp(Var log w). While
    the policies stay close (small updates) w ~ 1 and this estimate agrees with the reverse one to
    second order; when they drift apart -- exactly the regime of Sec. 4's unstable runs -- w is
    heavy-tailed, a few sequences carry the batch mean and batch estimates spread widely (and are
    usually too low: the rare large-w sequences that hold the mass are often not in the batch).
    `effective_sample_fraction(log w)` over the batch tells when that happens.
    The self-normalised alternative sum_i w_i log w_i / sum_i w_i is not offered: it has lower variance
    but is biased (a ratio estimator, O(1/n)) and needs the whole global batch, not per-sequence values.

    Numerics: computed in float64 (w up to e^709) and returned in the input dtype, so a float32 caller
    sees inf once sum_t (new - old) > ~88, i.e. when the two policies are wildly different anyway.
    """
    _check_same_shape(old_logprobs=old_logprobs, new_logprobs=new_logprobs, response_mask=response_mask)
    _check_kl_estimator(estimator)
    log_w = masked_sum(new_logprobs.double() - old_logprobs.double(), response_mask)
    w = log_w.exp()
    kl = w * log_w
    if estimator == "k3":
        kl = kl - torch.expm1(log_w)
    return kl.to(old_logprobs.dtype)


def effective_sample_fraction(log_weights: Tensor) -> Tensor:
    """Kish's effective sample size of importance weights as a fraction of n: (sum w)^2 / (n sum w^2).

    log_weights: [n] (e.g. sum_t (new - old) per sequence over the GLOBAL batch). 1 when every weight is
    equal, 1/n when one sequence carries all the weight; a small value warns that the importance-weighted
    KL(pi_new || pi_old) of this batch rests on a few sequences. Computed from log weights (no overflow).
    """
    if log_weights.dim() != 1 or log_weights.numel() == 0:
        raise ValueError(f"`log_weights` must be a non-empty 1-D tensor, got shape {tuple(log_weights.shape)}")
    log_w = log_weights.double()
    n = log_w.numel()
    value = (2.0 * torch.logsumexp(log_w, 0) - torch.logsumexp(2.0 * log_w, 0) - math.log(n)).exp()
    return value.to(log_weights.dtype)


@dataclass
class SampledEntropy:
    """One-sample estimates of the sequence entropy, per response (Fig. 1-2's entropy curve, unweighted)."""

    sequence: Tensor  # [B] -log pi(y|x) = sum_t -log pi(y_t | x, y_<t) over real tokens; E_pi[.] = H(pi(.|x))
    per_token: Tensor  # [B] the same divided by |y| (0 for an empty response)


def sampled_entropy(logprobs: Tensor, response_mask: Tensor) -> SampledEntropy:
    """-log pi(y|x) of each sampled response, and its per-token mean. [B, T] -> [B], [B].

    logprobs: log pi(y_t | x, y_<t) of the sampled tokens at the training temperature (logits / T, as the
    rollout computes them); response_mask: 1 on real response tokens. The sum is an unbiased one-sample
    estimate of the sequence entropy H(pi(.|x)) for y ~ pi. It does not depend on the regulariser or its
    coefficient: the entropy regulariser's reward term is coef times it (Eq. 6), or coef times the
    per-token mean with length normalisation (Eq. 7), see `regularized_reward`. The batch mean of
    `per_token` is a mean over sequences of per-sequence means (each response counts once).
    """
    _check_same_shape(logprobs=logprobs, response_mask=response_mask)
    neg_logp = -masked_sum(logprobs, response_mask)
    lengths = response_mask.to(neg_logp.dtype).sum(-1)
    return SampledEntropy(sequence=neg_logp, per_token=neg_logp / lengths.clamp_min(1.0))
