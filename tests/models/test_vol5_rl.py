"""DQN with a target network on the gridworld; GAE and the PPO clipped objective against their definitions."""

import copy

import torch

from gpuforge.models import vol5_rl as m5


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
