"""The RLHF mathematics (engine/objectives/rl.py) against hand computations and numpy: GAE, the
clipped objectives at their boundaries, KL estimators, GRPO advantages, KL control, whitening,
running moments, distinct-n."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from minigpt_cli.engine.objectives import rl

# One thread for tiny tensors (`conftest.one_thread` says why).
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ masked stats


def test_masked_mean_ignores_masked_positions_and_an_empty_mask_gives_zero() -> None:
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, -50.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert float(rl.masked_mean(values, mask)) == pytest.approx(2.0)
    torch.testing.assert_close(rl.masked_mean(values, mask, dim=1), torch.tensor([1.5, 3.0]))
    assert float(rl.masked_mean(values, torch.zeros_like(mask))) == 0.0


def test_whitening_gives_mean_zero_and_unit_std_on_masked_positions_only() -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(4, 7, generator=generator) * 3.0 + 5.0
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    values[~mask] = 1e6  # huge padding values must not leak into the statistics
    whitened = rl.masked_whiten(values, mask)
    kept = whitened[mask]
    assert float(kept.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(kept.std()) == pytest.approx(1.0, abs=1e-5)  # unbiased, as TRL
    assert torch.equal(whitened[~mask], torch.zeros(int((~mask).sum())))
    # Same real numbers with other padding: the same result.
    other = values.clone()
    other[~mask] = -3.0
    torch.testing.assert_close(rl.masked_whiten(other, mask), whitened)
    # shift_mean=False keeps the mean, only rescales.
    scaled = rl.masked_whiten(values, mask, shift_mean=False)[mask]
    real = values[mask]
    assert float(scaled.mean()) == pytest.approx(float(real.mean()), rel=1e-5)
    assert float(scaled.std()) == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------------------------ KL


def test_kl_is_exactly_zero_when_policy_equals_reference_and_positive_otherwise() -> None:
    logps = torch.tensor([[-0.5, -2.0, -7.25], [-1.0, -0.01, -3.0]])
    for estimator in ("k1", "k3"):
        assert torch.equal(rl.per_token_kl(logps, logps.clone(), estimator), torch.zeros(2, 3))
    # Policy distributions differ from the reference: the true KL and both estimators' means
    # over samples from the policy are positive.
    generator = torch.Generator().manual_seed(1)
    policy = torch.log_softmax(torch.randn(8, generator=generator) * 2, dim=0)
    reference = torch.log_softmax(torch.randn(8, generator=generator), dim=0)
    tokens = torch.multinomial(policy.exp(), 20000, replacement=True, generator=generator)
    true_kl = float((policy.exp() * (policy - reference)).sum())
    assert true_kl > 0
    for estimator in ("k1", "k3"):
        estimate = rl.per_token_kl(policy[tokens], reference[tokens], estimator)
        assert float(estimate.mean()) == pytest.approx(true_kl, rel=0.05)
    k3 = rl.per_token_kl(policy[tokens], reference[tokens], "k3")
    assert bool((k3 >= 0).all()) and float(k3.min()) >= 0.0
    # k3 by hand: r = ref - logp = -1 -> e^-1 + 1 - 1.
    one = rl.per_token_kl(torch.tensor([0.0]), torch.tensor([-1.0]), "k3")
    assert float(one) == pytest.approx(math.exp(-1.0))
    with pytest.raises(ValueError, match="k1"):
        rl.per_token_kl(logps, logps, "k2")  # type: ignore[arg-type]


def test_kl_penalised_rewards_put_the_score_on_the_last_real_token() -> None:
    policy = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-1.0, -1.0, -1.0, -1.0]])
    reference = torch.tensor([[-1.5, -2.0, -1.0, -1.0], [-1.0, -3.0, -1.0, -1.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    scores = torch.tensor([2.0, -1.0])
    rewards = rl.kl_penalised_rewards(scores, policy, reference, mask, kl_coef=0.1)
    expected = torch.tensor(
        [
            [-0.05, 0.0, -0.05 + 2.0, 0.0],  # k1 = (0.5, 0, 0.5, padding)
            [0.0, -0.2, 0.0, -1.0],  # k1 = (0, 2, 0, 0); score on the 4th token
        ]
    )
    torch.testing.assert_close(rewards, expected)
    k3 = rl.kl_penalised_rewards(scores, policy, reference, mask, kl_coef=1.0, estimator="k3")
    assert float(k3[1, 1]) == pytest.approx(-(math.exp(-2.0) + 2.0 - 1.0))
    with pytest.raises(ValueError, match="at least one token"):
        rl.kl_penalised_rewards(scores, policy, reference, mask & False, kl_coef=0.1)


# ------------------------------------------------------------------------------------ GAE


def test_gae_matches_hand_computed_examples_and_padding_gets_zero() -> None:
    # Row 0: three real tokens. Row 1: two real tokens, then padding holding junk.
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.6, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])

    advantages, returns = rl.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # gamma=1, lam=0.95, row 0 by hand:
    #   d2 = 1.0 - 0.3 = 0.7                  A2 = 0.7
    #   d1 = -0.2 + 0.3 - 0.4 = -0.3          A1 = -0.3 + 0.95 * 0.7 = 0.365
    #   d0 = 0.1 + 0.4 - 0.5 = 0.0            A0 = 0.0 + 0.95 * 0.365 = 0.34675
    # row 1 (the value after its last real token is 0, not the padding's 9):
    #   d1 = 1.0 - 0.6 = 0.4                  A1 = 0.4
    #   d0 = 0.0 + 0.6 - 0.2 = 0.4            A0 = 0.4 + 0.95 * 0.4 = 0.78
    torch.testing.assert_close(advantages, torch.tensor([[0.34675, 0.365, 0.7], [0.78, 0.4, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.84675, 0.765, 1.0], [0.98, 1.0, 0.0]]))

    advantages, returns = rl.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # gamma=0.9, lam=0.8 (gamma * lam = 0.72), row 0:
    #   d2 = 0.7                              A2 = 0.7
    #   d1 = -0.2 + 0.9 * 0.3 - 0.4 = -0.33   A1 = -0.33 + 0.72 * 0.7 = 0.174
    #   d0 = 0.1 + 0.9 * 0.4 - 0.5 = -0.04    A0 = -0.04 + 0.72 * 0.174 = 0.08528
    # row 1:
    #   d1 = 1.0 - 0.6 = 0.4                  A1 = 0.4
    #   d0 = 0.9 * 0.6 - 0.2 = 0.34           A0 = 0.34 + 0.72 * 0.4 = 0.628
    torch.testing.assert_close(advantages, torch.tensor([[0.08528, 0.174, 0.7], [0.628, 0.4, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.58528, 0.574, 1.0], [0.828, 1.0, 0.0]]))
    assert advantages[1, 2] == 0.0 and returns[1, 2] == 0.0


# ------------------------------------------------------------------------------------ PPO


def _policy_case(ratios: list[float], advantages: list[float], eps: float = 0.2):
    old = torch.zeros(1, len(ratios))
    logps = torch.log(torch.tensor([ratios])).requires_grad_(True)
    adv = torch.tensor([advantages])
    mask = torch.ones(1, len(ratios), dtype=torch.bool)
    loss, clip_frac, approx_kl = rl.ppo_policy_loss(logps, old, adv, mask, eps)
    loss.backward()
    return loss, clip_frac, approx_kl, logps.grad[0]


def test_clipped_policy_objective_at_the_clip_boundaries() -> None:
    eps = 0.2
    #            beyond 1+eps, A>0   beyond 1+eps, A<0   beyond 1-eps, A<0   beyond 1-eps, A>0
    ratios = [1.3, 1.3, 0.7, 0.7, 1.1, 1.1]
    advantages = [2.0, -2.0, -1.0, 1.0, 1.5, -1.5]  # the last two inside the region
    loss, clip_frac, approx_kl, grad = _policy_case(ratios, advantages, eps)
    # Where the clip binds (ratio past 1+eps with A>0, past 1-eps with A<0): zero gradient and
    # the clipped value; elsewhere the unclipped -A*r with gradient d(-A r)/d logp = -A r / n.
    n = len(ratios)
    expected_per_token = [-2.0 * 1.2, 2.0 * 1.3, 1.0 * 0.8, -1.0 * 0.7, -1.5 * 1.1, 1.5 * 1.1]
    assert float(loss.detach()) == pytest.approx(sum(expected_per_token) / n, rel=1e-6)
    assert grad[0] == 0.0 and grad[2] == 0.0
    for index in (1, 3, 4, 5):
        want = -advantages[index] * ratios[index] / n
        assert float(grad[index]) == pytest.approx(want, rel=1e-5)
    assert float(clip_frac) == pytest.approx(2 / 6)
    logs = [math.log(r) for r in ratios]
    assert float(approx_kl) == pytest.approx(0.5 * sum(x * x for x in logs) / n, rel=1e-5)


def test_clip_frac_counts_nothing_inside_the_region_or_on_its_edge() -> None:
    eps = 0.25  # exp(log(1.25)) and exp(log(0.75)) give back exactly 1.25 and 0.75 in fp32
    ratios = [1.0 + eps, 1.0 - eps, 1.0, 1.0]
    advantages = [1.0, -1.0, 3.0, -3.0]
    _, clip_frac, _, grad = _policy_case(ratios, advantages, eps)
    assert float(clip_frac) == 0.0
    # At the edge the gradient is still the unclipped one (nothing is cut yet).
    for index in range(4):
        want = -advantages[index] * ratios[index] / 4
        assert float(grad[index]) == pytest.approx(want, rel=1e-5)
    # Padding tokens count in neither the loss nor clip_frac.
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[1.5, 1.5, 1.0]]))
    mask = torch.tensor([[False, True, True]])
    loss, clip_frac, _ = rl.ppo_policy_loss(logps, old, torch.tensor([[9.0, 1.0, 1.0]]), mask, 0.2)
    assert float(clip_frac) == pytest.approx(0.5)
    assert float(loss) == pytest.approx((-1.2 - 1.0) / 2)


def test_value_loss_takes_the_larger_of_the_clipped_and_unclipped_errors() -> None:
    old = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    values = torch.tensor([[1.5, 1.5, 1.05, 7.0]], requires_grad=True)
    returns = torch.tensor([[2.0, 1.0, 2.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss = rl.ppo_value_loss(values, old, returns, mask, clip_eps=0.2)
    # token 0: V moved 1.0 -> 1.5 towards R=2; clipped V = 1.2: errors 0.25 vs 0.64 -> 0.64.
    # token 1: V moved away from R=1; clipped 1.2: errors 0.25 vs 0.04 -> 0.25 (unclipped).
    # token 2: inside the clip range: both 0.9025. token 3: padding.
    assert float(loss.detach()) == pytest.approx(0.5 * (0.64 + 0.25 + 0.9025) / 3, rel=1e-6)
    loss.backward()
    grad = values.grad[0]
    assert grad[0] == 0.0  # the clipped error was the larger: no gradient through V
    assert float(grad[1]) == pytest.approx((1.5 - 1.0) / 3, rel=1e-5)
    assert float(grad[2]) == pytest.approx((1.05 - 2.0) / 3, rel=1e-5)
    assert grad[3] == 0.0


def test_adaptive_kl_coefficient_rises_over_target_and_falls_under() -> None:
    over = rl.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert over.update(9.0, n_steps=256) > 0.1
    # Ziegler et al.: error clipped to +0.2 -> 0.1 * (1 + 0.2 * 256 / 10000).
    assert over.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    under = rl.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    under.update(4.5, n_steps=256)  # error -0.25 clipped to -0.2
    assert under.value == pytest.approx(0.1 * (1 - 0.2 * 256 / 10000))
    exact = rl.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    exact.update(6.6, n_steps=1000)  # error 0.1, inside the clip
    assert exact.value == pytest.approx(0.1 * (1 + 0.1 * 1000 / 10000))
    restored = rl.AdaptiveKLController(0.5, target=6.0, horizon=10000)
    restored.load_state_dict(json.loads(json.dumps(exact.state_dict())))
    assert restored.value == exact.value
    fixed = rl.FixedKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05 and fixed.value == 0.05


def test_ceiling_kl_coefficient_rises_fast_over_target_and_never_falls_below_its_start() -> None:
    ceiling = rl.CeilingKLController(1.0, target=0.05, horizon=64)
    ceiling.update(0.0, n_steps=16)  # under the target from the start: stays at the start
    assert ceiling.value == 1.0
    ceiling.update(0.2, n_steps=16)  # 4x the target: error clipped to +1, not Ziegler's +0.2
    assert ceiling.value == pytest.approx(1.0 * (1 + 1.0 * 16 / 64))
    ceiling.update(0.06, n_steps=16)  # error 0.2, inside the clip
    assert ceiling.value == pytest.approx(1.25 * (1 + 0.2 * 16 / 64))
    ceiling.update(0.0, n_steps=16)  # under it: relaxed at most 0.2 * 16 / 64 = 5 %
    assert ceiling.value == pytest.approx(1.25 * 1.05 * 0.95)
    for _ in range(20):
        ceiling.update(-0.01, n_steps=16)  # a negative estimate: still not below the start
    assert ceiling.value == 1.0
    restored = rl.CeilingKLController(1.0, target=0.05, horizon=64)
    ceiling.update(0.1, n_steps=16)
    restored.load_state_dict(json.loads(json.dumps(ceiling.state_dict())))
    assert restored.value == ceiling.value and restored.floor == 1.0


# ------------------------------------------------------------------------------------ GRPO


def test_grpo_advantages_are_zero_for_tied_groups_and_standardised_otherwise() -> None:
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.1, 1.0, 0.0, 0.0, 3.0, -2.0, -2.0, -2.0, -2.0])
    advantages = rl.grpo_advantages(rewards, group_size=4)
    assert torch.equal(advantages[:4], torch.zeros(4))  # 0.1 four times: exactly zero
    assert torch.equal(advantages[8:], torch.zeros(4))
    middle = advantages[4:8]
    assert float(middle.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(middle.std()) == pytest.approx(1.0, abs=1e-3)  # std + 1e-4 in the denominator
    group = np.array([1.0, 0.0, 0.0, 3.0])
    by_hand = (group - group.mean()) / (group.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(middle.numpy(), by_hand, rtol=1e-6)
    centred = rl.grpo_advantages(rewards, group_size=4, scale=False)
    np.testing.assert_allclose(centred[4:8].numpy(), group - group.mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="groups of 4"):
        rl.grpo_advantages(rewards[:10], group_size=4)
    with pytest.raises(ValueError, match="at least 2"):
        rl.grpo_advantages(rewards, group_size=1)


def test_grpo_loss_averages_per_sequence_then_over_sequences() -> None:
    # Sequence 0: one token; sequence 1: three tokens (one padding). Policy == old == reference,
    # so the ratio is 1, the KL 0, and the per-token loss is -A.
    logps = torch.tensor([[-1.0, -5.0, -5.0, -5.0], [-0.5, -0.7, -0.2, -9.0]], requires_grad=True)
    mask = torch.tensor([[True, False, False, False], [True, True, True, False]])
    advantages = torch.tensor([2.0, -1.0])
    loss, clip_frac, kl = rl.grpo_loss(
        logps, logps.detach(), logps.detach(), advantages, mask, clip_eps=0.2, kl_coef=0.1
    )
    assert float(loss.detach()) == pytest.approx((-2.0 + 1.0) / 2)  # per-sequence means, then mean
    assert float(clip_frac) == 0.0 and float(kl) == 0.0
    loss.backward()
    # d loss / d logp: -A * ratio / tokens-in-sequence / sequences (the k3 gradient is 0 here).
    torch.testing.assert_close(
        logps.grad,
        torch.tensor([[-1.0, 0.0, 0.0, 0.0], [1 / 6, 1 / 6, 1 / 6, 0.0]]),
    )
    # Moving away from the reference adds kl_coef * k3 per token.
    ref = logps.detach() - torch.tensor([[0.5, 0, 0, 0], [0.0, 0.0, 0.0, 0.0]])
    loss, _, kl = rl.grpo_loss(logps, logps.detach(), ref, advantages, mask, 0.2, 0.1)
    k3 = math.exp(-0.5) + 0.5 - 1.0
    assert float(kl) == pytest.approx(k3 / 2)
    assert float(loss.detach()) == pytest.approx((-2.0 + 0.1 * k3 + 1.0) / 2, rel=1e-6)


# ------------------------------------------------------------------------------------ logging


def test_entropy_and_logps_from_logits() -> None:
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]]])
    mask = torch.tensor([[True, True, False]])
    # Uniform over 4: ln 4; a near one-hot: ~0; the third position is masked out.
    assert float(rl.entropy_from_logits(logits, mask)) == pytest.approx(math.log(4) / 2, rel=1e-5)
    logps = rl.logps_from_logits(logits, torch.tensor([[1, 0, 3]]))
    expected = [math.log(0.25), 0.0, 4.0 - math.log(sum(math.exp(v) for v in (1, 2, 3, 4)))]
    torch.testing.assert_close(logps[0], torch.tensor(expected), atol=1e-6, rtol=1e-6)


def test_distinct_n_on_a_hand_example() -> None:
    samples = [[1, 2, 1, 2, 1], [3, 4], [5]]
    # bigrams: (1,2) (2,1) (1,2) (2,1) | (3,4) | none: 3 distinct of 5.
    assert rl.distinct_n(samples, 2) == pytest.approx(3 / 5)
    assert rl.distinct_n(samples, 1) == pytest.approx(5 / 8)
    assert rl.distinct_n([[7, 7, 7, 7]], 2) == pytest.approx(1 / 3)
    assert rl.distinct_n([[1], []], 2) == 0.0


def test_running_moments_match_numpy_on_a_stream_and_survive_a_round_trip() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size) for size in (1, 7, 64, 3, 200)]
    moments = rl.RunningMoments()
    seen: list[float] = []
    for batch in batches:
        moments.update(torch.tensor(batch, dtype=torch.float32))
        seen.extend(np.asarray(torch.tensor(batch, dtype=torch.float32), dtype=np.float64))
        assert moments.count == len(seen)
        assert moments.mean == pytest.approx(np.mean(seen), rel=1e-12)
        if len(seen) > 1:
            assert moments.std == pytest.approx(np.std(seen, ddof=1), rel=1e-10)
    restored = rl.RunningMoments()
    restored.load_state_dict(json.loads(json.dumps(moments.state_dict())))
    extra = rng.normal(-1.0, 0.5, 10)
    moments.update(extra)
    restored.update(extra)
    assert restored.state_dict() == moments.state_dict()


def test_normalise_and_clip_standardises_with_running_statistics() -> None:
    moments = rl.RunningMoments()
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0])
    normalised = rl.normalise_and_clip(scores, moments, clip=1.0)
    std = float(np.std([1.0, 2.0, 3.0, 10.0], ddof=1))
    expected = np.clip((np.array([1.0, 2.0, 3.0, 10.0]) - 4.0) / std, -1.0, 1.0)
    np.testing.assert_allclose(normalised.numpy(), expected, rtol=1e-6)
    assert float(normalised.max()) == 1.0  # the outlier is clipped
    again = rl.normalise_and_clip(torch.tensor([4.0]), moments, clip=None, update=False)
    assert float(again) == pytest.approx(0.0, abs=1e-7) and moments.count == 4
    lone = rl.normalise_and_clip(torch.tensor([5.0]), rl.RunningMoments(), clip=3.0)
    assert float(lone) == 0.0  # one number: centred, not divided by a zero std


def test_response_outputs_run_the_head_on_real_tokens_only_and_match_the_dense_head() -> None:
    from minigpt_cli.engine.inference.rollouts import pack_responses
    from minigpt_cli.engine.model.heads import PolicyWithValue
    from minigpt_cli.engine.objectives.policy import response_outputs
    from tests.test_model import VOCAB, make_model

    generator = torch.Generator().manual_seed(3)

    def tokens(count: int) -> list[int]:
        return torch.randint(1, VOCAB, (count,), generator=generator).tolist()

    prompts = [tokens(3), tokens(5)]
    lengths = (1, 20, 3, 2, 5, 4)  # 35 real tokens of 6 x 20 positions
    batch = pack_responses(prompts, [(n % 2, tokens(n)) for n in lengths], pad_id=0)
    mask = batch["mask"]
    model = PolicyWithValue(make_model())
    head_rows: list[int] = []
    model.policy.lm_head.register_forward_hook(lambda m, i, o: head_rows.append(i[0].shape[0]))
    logps, values, entropy = response_outputs(model, batch, with_values=True, with_entropy=True)
    (logps * torch.linspace(0.5, 2.0, mask.numel()).view(mask.shape)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    assert int(mask.sum()) == 35 and mask.numel() == 120
    assert head_rows == [64]  # the 35 real rows and padding ones up to a multiple of 32

    # The dense way: every (B, R) position through the head, picked logit minus logsumexp.
    hidden = model.policy.hidden_states(batch["ids"][:, :-1])
    index = (batch["positions"] - 1).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    logits = model.policy.lm_head(hidden.gather(1, index)).float()
    picked = logits.gather(-1, batch["ids"].gather(1, batch["positions"]).unsqueeze(-1))
    dense = picked.squeeze(-1) - torch.logsumexp(logits, dim=-1)
    (dense * mask * torch.linspace(0.5, 2.0, mask.numel()).view(mask.shape)).sum().backward()
    torch.testing.assert_close(logps[mask], dense[mask], atol=1e-5, rtol=1e-5)
    assert bool((logps[~mask] == 0).all())
    assert values is not None and values.shape == mask.shape
    assert entropy is not None
    dense_entropy = rl.entropy_from_logits(logits.detach(), mask)
    assert float(entropy) == pytest.approx(float(dense_entropy), rel=1e-5)
    for got, want in zip(
        grads, [p.grad for p in model.parameters() if p.grad is not None], strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
