"""Volume 5, reinforcement learning: DQN on a gridworld, and the PPO actor-critic pieces (GAE, clipped loss).

Gridworld: N×N cells, start (0, 0), goal (N−1, N−1) paying reward 1 and ending the episode; actions up, down,
left, right (moves off the grid stay put); discount γ = 0.9. DQN: a Q-network trained on the TD target
r + γ (1 − done) maxₐ' Q_target(s', a') with a separate target network, on transitions drawn uniformly (the
replay buffer of a fully explored world). PPO: generalised advantage estimation
Â_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ V(s_{t+1})(1 − done_t) − V(s_t), and the clipped surrogate
−E[min(ρ Â, clip(ρ, 1 − ε, 1 + ε) Â)] with ε = 0.2, ρ = π_new(a|s) / π_old(a|s).

gpuforge ops exercised: matmul, softmax (the policy). Parallel strategy: DDP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpuforge.models._layers import ReferenceModel, Softmax, to_model_dtype

GRID, GAMMA = 4, 0.9
MOVES = torch.tensor([[-1, 0], [1, 0], [0, -1], [0, 1]])


def grid_step(pos: torch.Tensor, action: torch.Tensor):
    """pos (B, 2) int64, action (B,) -> (next pos, reward (B,), done (B,) bool)."""
    nxt = (pos + MOVES[action]).clamp(0, GRID - 1)
    done = (nxt == GRID - 1).all(-1)
    return nxt, done.float(), done


def one_hot_state(pos: torch.Tensor) -> torch.Tensor:
    return F.one_hot(pos[:, 0] * GRID + pos[:, 1], GRID * GRID).float()


class QNetwork(nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(GRID * GRID, hidden), nn.ReLU(), nn.Linear(hidden, 4))

    def forward(self, state):
        return self.net(state)


def make_transition_batch(seed: int, batch_size: int):
    """Uniform (s, a) over non-goal cells -> (state, action, reward, next_state, done)."""
    generator = torch.Generator().manual_seed(seed)
    cell = torch.randint(GRID * GRID - 1, (batch_size,), generator=generator)
    pos = torch.stack([cell // GRID, cell % GRID], -1)
    action = torch.randint(4, (batch_size,), generator=generator)
    nxt, reward, done = grid_step(pos, action)
    return one_hot_state(pos), action, reward, one_hot_state(nxt), done.float()


def dqn_loss(model: QNetwork, batch, target: QNetwork | None = None) -> torch.Tensor:
    """Huber loss between Q(s, a) and r + γ(1 − done) maxₐ' Q_target(s', a'); target defaults to the model
    itself (detached)."""
    state, action, reward, next_state, done = to_model_dtype(model, *batch)
    with torch.no_grad():
        next_q = (target or model)(next_state).max(-1).values
        y = reward + GAMMA * (1 - done) * next_q
    return F.smooth_l1_loss(model(state).gather(-1, action[:, None]).squeeze(-1), y)


@torch.no_grad()
def greedy_path_length(model: QNetwork, max_steps: int = 20) -> int:
    """Steps the greedy policy takes from the start to the goal (max_steps + 1 if it never arrives)."""
    pos = torch.zeros(1, 2, dtype=torch.int64)
    for step in range(1, max_steps + 1):
        q = model(one_hot_state(pos).to(next(model.parameters()).dtype))
        pos, _, done = grid_step(pos, q.argmax(-1))
        if done.item():
            return step
    return max_steps + 1


class ActorCritic(nn.Module):
    """Shared trunk; policy logits and a value head. forward(state) -> (action probabilities, value)."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(GRID * GRID, hidden), nn.Tanh())
        self.policy, self.value = nn.Linear(hidden, 4), nn.Linear(hidden, 1)
        self.softmax = Softmax(dim=-1)

    def forward(self, state):
        h = self.trunk(state)
        return self.softmax(self.policy(h)), self.value(h).squeeze(-1)


def gae(rewards, values, dones, gamma: float = GAMMA, lam: float = 0.95):
    """rewards, dones (T,); values (T + 1,) including the bootstrap value -> (advantages, returns) (T,)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros((), dtype=rewards.dtype)
    for t in reversed(range(len(rewards))):
        alive = 1.0 - dones[t]
        delta = rewards[t] + gamma * values[t + 1] * alive - values[t]
        running = delta + gamma * lam * alive * running
        advantages[t] = running
    return advantages, advantages + values[:-1]


def ppo_clip_loss(logp_new, logp_old, advantages, clip: float = 0.2) -> torch.Tensor:
    """−E[min(ρ Â, clip(ρ, 1 − ε, 1 + ε) Â)], ρ = exp(logp_new − logp_old)."""
    ratio = torch.exp(logp_new - logp_old)
    return -torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages).mean()


REFERENCE_MODELS = {
    "dqn_gridworld": ReferenceModel(QNetwork, make_transition_batch, dqn_loss),
}
