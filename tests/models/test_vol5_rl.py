"""DQN with a target network on the gridworld; GAE and the PPO clipped objective against their definitions; PPO
training; the Decision Transformer (loss, return-conditioned rollouts, return-to-go bookkeeping, float64)."""

import copy

import pytest
import torch

import gpuforge as gf
from gpuforge.models import vol5_rl as m5
from gpuforge.nn import ScaledDotProductAttention as KernelAttention
from tests.helpers import assert_close_rel


def test_dqn_with_target_network_finds_the_shortest_path():
    torch.manual_seed(0)
    model = m5.QNetwork()
    target = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(400):
        if step % 25 == 0:
            target.load_state_dict(model.state_dict())
        loss = m5.dqn_loss(model, m5.make_transition_batch(step, 64), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m5.greedy_path_length(model) == 2 * (m5.GRID - 1)  # 6 moves on a 4×4 grid
    # Q(start, best) approaches the optimal value γ^5 (reward 1 on the 6th move)
    q_start = model(m5.one_hot_state(torch.zeros(1, 2, dtype=torch.int64))).max().item()
    assert abs(q_start - m5.GAMMA ** 5) < 0.1, q_start


def test_gae_limits():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    dones = torch.tensor([0, 0, 1, 0, 0, 0], dtype=torch.float64)
    adv0, _ = m5.gae(rewards, values, dones, lam=0.0)
    alive = 1 - dones
    torch.testing.assert_close(adv0, rewards + m5.GAMMA * values[1:] * alive - values[:-1])
    adv1, returns = m5.gae(rewards, values, dones, lam=1.0)
    expected = torch.zeros(6, dtype=torch.float64)
    future = values[-1]
    for t in reversed(range(6)):
        future = rewards[t] + m5.GAMMA * alive[t] * future
        expected[t] = future
    torch.testing.assert_close(returns, expected)  # λ = 1: Monte Carlo returns (bootstrapped at the end)
    torch.testing.assert_close(adv1, expected - values[:-1])


def test_ppo_clip_has_no_gradient_beyond_the_clip():
    logp_old = torch.zeros(4, dtype=torch.float64)
    ratios = torch.tensor([1.5, 0.5, 1.1, 0.7], dtype=torch.float64)
    advantages = torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    logp_new = ratios.log().requires_grad_()
    loss = m5.ppo_clip_loss(logp_new, logp_old, advantages)
    torch.testing.assert_close(loss.item(), -(1.2 * 1 + 0.8 * -1 + 1.1 + 0.7) / 4)
    (grad,) = torch.autograd.grad(loss, logp_new)
    # clipped (ρ > 1.2 with Â > 0, ρ < 0.8 with Â < 0): zero; inside, or pessimistic side (0.7, Â > 0): −ρÂ/4
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, -1.1 / 4, -0.7 / 4], dtype=torch.float64))


def test_actor_critic_outputs_a_distribution():
    torch.manual_seed(0)
    probs, value = m5.ActorCritic()(m5.one_hot_state(torch.tensor([[0, 0], [2, 3]])))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    assert value.shape == (2,)


def test_ppo_training_reaches_the_goal_in_the_optimal_number_of_steps():
    torch.manual_seed(0)
    model = m5.ActorCritic()
    before = m5.policy_episode_lengths(model, 200, torch.Generator().manual_seed(1))
    m5.train_ppo(model, iterations=15, seed=0)
    after = m5.policy_episode_lengths(model, 200, torch.Generator().manual_seed(1))
    optimal = 2 * (m5.GRID - 1)
    assert (before == optimal).float().mean() < 0.1  # the untrained policy wanders
    assert (after == optimal).float().mean() >= 0.8, after  # sampled (not greedy) episodes, 6 moves
    mean_return = lambda lengths: (m5.GAMMA ** (lengths - 1.0) * (lengths <= 20)).mean()  # noqa: E731
    assert mean_return(after) > 0.55 > mean_return(before) + 0.2  # optimum γ⁵ ≈ 0.59


@pytest.fixture(scope="module")
def trained_dt():
    torch.manual_seed(0)
    model = m5.TinyDecisionTransformer()
    held_out = m5.make_dt_batch(10**6, 512)
    valid = held_out[-1]
    per_action = valid.numel() / valid.sum().item()  # dt_loss divides by B·T; this makes it nats per action
    with torch.no_grad():
        initial = m5.dt_loss(model, held_out).item() * per_action
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):
        loss = m5.dt_loss(model, m5.make_dt_batch(step, 64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = m5.dt_loss(model, held_out).item() * per_action
    return model, initial, final


def test_decision_transformer_loss_falls(trained_dt):
    _, initial, final = trained_dt
    # ln 4 ≈ 1.386 is the loss of ignoring the context; the optimal moves' coin flip keeps the floor near 0.7-0.9
    assert initial > 1.3 and final < 1.1, (initial, final)


def test_decision_transformer_conditioned_on_the_optimal_return_reaches_the_goal(trained_dt):
    model, _, _ = trained_dt
    optimal = 2 * (m5.GRID - 1)
    lengths, _, rewards = m5.dt_rollout(model, m5.OPTIMAL_RETURN)
    assert lengths.item() == optimal
    torch.testing.assert_close(rewards.sum().item(), m5.OPTIMAL_RETURN)
    sampled, _, _ = m5.dt_rollout(model, m5.OPTIMAL_RETURN, 200, torch.Generator().manual_seed(1))
    assert (sampled == optimal).float().mean() >= 0.8
    # conditioning matters: asking for the return of a wandering episode (never arriving in 10 moves) gives one
    low, _, _ = m5.dt_rollout(model, -m5.STEP_COST * m5.DT_STEPS, 200, torch.Generator().manual_seed(1))
    assert (low == optimal).float().mean() < 0.2


def test_return_to_go_starts_at_the_target_and_decrements_by_each_reward(trained_dt):
    model, _, _ = trained_dt
    _, rtg, rewards = m5.dt_rollout(model, 0.7, 8, torch.Generator().manual_seed(2))
    assert rtg.shape == (8, m5.DT_STEPS) and rewards.shape == (8, m5.DT_STEPS)
    torch.testing.assert_close(rtg[:, 0], torch.full((8,), 0.7))
    torch.testing.assert_close(rtg[:, 1:], rtg[:, :-1] - rewards[:, :-1])
    assert (rewards[:, 0] == -m5.STEP_COST).all()  # the first move cannot reach the goal


def test_decision_transformer_batch_return_to_go_is_the_sum_of_future_rewards():
    rtg, states, actions, timesteps, valid = m5.make_dt_batch(3, 64)
    assert rtg.shape == (64, m5.DT_STEPS, 1) and valid[:, 0].all()
    pos = torch.stack([states // m5.GRID, states % m5.GRID], -1).flatten(0, 1)
    _, reward, _ = m5.dt_step(pos, actions.flatten())
    reward = torch.where(valid, reward.view(64, m5.DT_STEPS), 0.0)
    torch.testing.assert_close(rtg[..., 0], reward.flip(1).cumsum(1).flip(1))
    assert (rtg[:, 0, 0] - m5.OPTIMAL_RETURN).abs().min() < 1e-6  # some episodes are optimal
    assert rtg[:, 0, 0].max() <= m5.OPTIMAL_RETURN + 1e-6
    assert timesteps[0].tolist() == list(range(m5.DT_STEPS))


def test_decision_transformer_float64_matches_float32():
    torch.manual_seed(0)
    model = m5.TinyDecisionTransformer()
    batch = m5.make_dt_batch(0, 4)
    loss32 = m5.dt_loss(model, batch)
    model64 = copy.deepcopy(model).double()
    loss64 = m5.dt_loss(model64, batch)
    assert loss64.dtype == torch.float64
    torch.testing.assert_close(loss64.float(), loss32, rtol=1e-5, atol=1e-6)
    lengths, rtg, rewards = m5.dt_rollout(model64, m5.OPTIMAL_RETURN, 3, torch.Generator().manual_seed(0))
    assert rtg.dtype == rewards.dtype == torch.float64
    torch.testing.assert_close(rtg[:, 1:], rtg[:, :-1] - rewards[:, :-1], rtol=0, atol=1e-12)


def test_decision_transformer_attention_is_swapped_by_kernelize():
    torch.manual_seed(0)
    model = m5.TinyDecisionTransformer()
    rtg, states, actions, timesteps, _ = m5.make_dt_batch(0, 2)
    kernel_model = gf.kernelize(copy.deepcopy(model), backend="triton")
    assert any(isinstance(m, KernelAttention) for m in kernel_model.modules())
    with torch.no_grad():
        assert_close_rel(kernel_model(rtg, states, actions, timesteps), model(rtg, states, actions, timesteps),
                         2e-4, "decision transformer logits")
