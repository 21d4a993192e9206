"""Volume 5, reinforcement learning: DQN on a gridworld, and the PPO actor-critic pieces (GAE, clipped loss).

Gridworld: N×N cells, start (0, 0), goal (N−1, N−1) paying reward 1 and ending the episode; actions up, down,
left, right (moves off the grid stay put); discount γ = 0.9. DQN: a Q-network trained on the TD target
r + γ (1 − done) maxₐ' Q_target(s', a') with a separate target network, on transitions drawn uniformly (the
replay buffer of a fully explored world). PPO: generalised advantage estimation
Â_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ V(s_{t+1})(1 − done_t) − V(s_t), and the clipped surrogate
−E[min(ρ Â, clip(ρ, 1 − ε, 1 + ε) Â)] with ε = 0.2, ρ = π_new(a|s) / π_old(a|s).

PPO training: parallel gridworld rollouts (an episode that reaches the goal restarts at the start), GAE per
environment, then a few epochs of minibatch updates of clipped surrogate + value MSE − entropy bonus. The
registered `ppo_actor_critic` scores that loss on a fixed rollout batch of a seeded behaviour policy.
TinyDecisionTransformer: offline RL as sequence modelling. Per timestep three tokens (return-to-go, state,
action), each plus a timestep embedding; causal attention; the action is predicted from the state token.
Offline data: gridworld episodes (reward 1 at the goal minus a step cost of 0.1, at most DT_STEPS moves) from
policies mixing optimal and random moves. At evaluation the return-to-go starts at the target return and
each received reward is subtracted from it.

gpuforge ops exercised: matmul, softmax (the policy), flash_attention (causal, the decision transformer),
layer_norm (its blocks).
Parallel strategy: DDP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpuforge.models._layers import Attention, ReferenceModel, Softmax, model_dtype, to_model_dtype

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


# ----------------------------------------------------------------------------------------------- PPO training

def collect_rollouts(model: ActorCritic, n_envs: int, horizon: int, generator: torch.Generator):
    """n_envs parallel episodes for `horizon` steps, sampling from the policy (an episode that reaches the goal
    restarts at the start) -> dict of (T, n_envs) tensors, states (T, n_envs, GRID²), and the bootstrap value."""
    dtype = model_dtype(model)
    pos = torch.zeros(n_envs, 2, dtype=torch.int64)
    keys = ("states", "actions", "logp", "values", "rewards", "dones")
    out = {key: [] for key in keys}
    with torch.no_grad():
        for _ in range(horizon):
            state = one_hot_state(pos).to(dtype)
            probs, value = model(state)
            action = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            nxt, reward, done = grid_step(pos, action)
            logp = probs.gather(-1, action[:, None]).squeeze(-1).log()
            for key, item in zip(keys, (state, action, logp, value, reward.to(dtype), done.to(dtype))):
                out[key].append(item)
            pos = torch.where(done[:, None], torch.zeros_like(nxt), nxt)
        bootstrap = model(one_hot_state(pos).to(dtype))[1]
    return {key: torch.stack(items) for key, items in out.items()}, bootstrap


def ppo_loss(model: ActorCritic, states, actions, logp_old, advantages, returns, value_coef: float = 0.5,
             entropy_coef: float = 0.01) -> torch.Tensor:
    """Clipped surrogate + value_coef · value MSE − entropy_coef · policy entropy, each a mean over every
    (state, action) given; the tensors may have any leading dims (states (..., GRID²), the others (...))."""
    probs, value = model(states)
    logp = probs.gather(-1, actions[..., None]).squeeze(-1).clamp_min(1e-12).log()
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
    return (ppo_clip_loss(logp, logp_old, advantages) + value_coef * F.mse_loss(value, returns)
            - entropy_coef * entropy)


def rollout_targets(rollout, bootstrap):
    """GAE per environment -> (advantages normalised to zero mean and unit std over the rollout, returns),
    both (T, n_envs)."""
    values = torch.cat([rollout["values"], bootstrap[None]])
    columns = [gae(rollout["rewards"][:, e], values[:, e], rollout["dones"][:, e]) for e in range(values.shape[1])]
    advantages = torch.stack([c[0] for c in columns], 1)
    returns = torch.stack([c[1] for c in columns], 1)
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8), returns


def ppo_update(model: ActorCritic, optimizer, rollout, bootstrap, *, epochs: int = 4, minibatch: int = 64,
               generator: torch.Generator, value_coef: float = 0.5, entropy_coef: float = 0.01):
    """GAE per environment, then `epochs` passes of shuffled minibatches of clipped surrogate + value loss."""
    advantages, returns = (x.flatten() for x in rollout_targets(rollout, bootstrap))
    states, actions = rollout["states"].flatten(0, 1), rollout["actions"].flatten()
    logp_old = rollout["logp"].flatten()
    for _ in range(epochs):
        for idx in torch.randperm(len(actions), generator=generator).split(minibatch):
            loss = ppo_loss(model, states[idx], actions[idx], logp_old[idx], advantages[idx], returns[idx],
                            value_coef, entropy_coef)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def train_ppo(model: ActorCritic, iterations: int, *, n_envs: int = 16, horizon: int = 32, lr: float = 1e-2,
              seed: int = 0) -> ActorCritic:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(iterations):
        rollout, bootstrap = collect_rollouts(model, n_envs, horizon, generator)
        ppo_update(model, optimizer, rollout, bootstrap, generator=generator)
    return model


@torch.no_grad()
def policy_episode_lengths(model: ActorCritic, n_episodes: int, generator: torch.Generator,
                           max_steps: int = 20) -> torch.Tensor:
    """Steps each sampled episode from the start takes to the goal (max_steps + 1 if it never arrives)."""
    pos = torch.zeros(n_episodes, 2, dtype=torch.int64)
    lengths = torch.full((n_episodes,), max_steps + 1)
    for step in range(1, max_steps + 1):
        probs, _ = model(one_hot_state(pos).to(model_dtype(model)))
        pos, _, done = grid_step(pos, torch.multinomial(probs, 1, generator=generator).squeeze(-1))
        lengths = torch.where(done & (lengths > max_steps), step, lengths)
    return lengths


PPO_HORIZON, BEHAVIOUR_SEED = 16, 1234


def make_ppo_batch(seed: int, batch_size: int):
    """A fixed rollout batch for one PPO update: `batch_size` environments run PPO_HORIZON steps each (see
    collect_rollouts), sampled (from `seed`) by the behaviour ("old") policy, an ActorCritic initialised from
    BEHAVIOUR_SEED, with its GAE advantages (normalised over the batch, as ppo_update does per rollout) and
    returns -> (states (B, T, GRID²), actions (B, T), logp_old (B, T), advantages (B, T), returns (B, T)).
    Environments are the samples; the loss averages over all B·T steps, so it is a mean over them."""
    with torch.random.fork_rng():
        torch.manual_seed(BEHAVIOUR_SEED)
        behaviour = ActorCritic()
    rollout, bootstrap = collect_rollouts(behaviour, batch_size, PPO_HORIZON, torch.Generator().manual_seed(seed))
    advantages, returns = rollout_targets(rollout, bootstrap)
    steps = (rollout["states"], rollout["actions"], rollout["logp"], advantages, returns)
    return tuple(x.transpose(0, 1).contiguous() for x in steps)


def ppo_rollout_loss(model: ActorCritic, batch) -> torch.Tensor:
    return ppo_loss(model, *to_model_dtype(model, *batch))


# ----------------------------------------------------------------------------------------------- Decision Transformer

DT_STEPS, STEP_COST = 10, 0.1
OPTIMAL_RETURN = 1.0 - STEP_COST * 2 * (GRID - 1)  # the goal in 6 moves: 0.4


def dt_step(pos: torch.Tensor, action: torch.Tensor):
    """The gridworld step with the decision transformer's reward: 1 at the goal minus STEP_COST per move."""
    nxt, reward, done = grid_step(pos, action)
    return nxt, reward - STEP_COST, done


class DTBlock(nn.Module):
    """Pre-LayerNorm transformer block with causal self-attention through `Attention`."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.attention = Attention()
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(self.attention(q, k, v, causal=True).transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.norm2(x))


class TinyDecisionTransformer(nn.Module):
    """forward(rtg (B, T, 1), states (B, T) cell ids, actions (B, T), timesteps (B, T)) -> action logits (B, T, 4).

    Tokens R_1, s_1, a_1, R_2, s_2, a_2, … each plus its timestep's embedding; the logits for a_t are read from
    the output at s_t, so causality lets a_t see R_≤t, s_≤t and a_<t only."""

    def __init__(self, dim: int = 32, n_heads: int = 2, n_layers: int = 2, max_steps: int = DT_STEPS):
        super().__init__()
        self.embed_rtg = nn.Linear(1, dim)
        self.embed_state, self.embed_action = nn.Embedding(GRID * GRID, dim), nn.Embedding(4, dim)
        self.embed_time = nn.Embedding(max_steps, dim)
        self.blocks = nn.Sequential(*[DTBlock(dim, n_heads) for _ in range(n_layers)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 4)

    def forward(self, rtg, states, actions, timesteps):
        b, t = states.shape
        tokens = torch.stack([self.embed_rtg(rtg), self.embed_state(states), self.embed_action(actions)], 2)
        tokens = tokens + self.embed_time(timesteps)[:, :, None]
        h = self.norm(self.blocks(tokens.reshape(b, 3 * t, -1)))
        return self.head(h[:, 1::3])


def make_dt_batch(seed: int, batch_size: int):
    """Offline episodes from the start, each from a policy taking a random move with probability ε ∈ {0, 0.25,
    0.5, 1} and otherwise an optimal one (down or right, at random) -> (rtg (B, T, 1), states, actions,
    timesteps, valid (B, T) bool); steps after the goal are padding (valid False)."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.tensor([0.0, 0.25, 0.5, 1.0])[torch.randint(4, (batch_size,), generator=g)]
    pos = torch.zeros(batch_size, 2, dtype=torch.int64)
    alive = torch.ones(batch_size, dtype=torch.bool)
    states, actions, rewards, valid = [], [], [], []
    for _ in range(DT_STEPS):
        coin = torch.randint(2, (batch_size,), generator=g).bool()
        down = (coin & (pos[:, 0] < GRID - 1)) | (pos[:, 1] == GRID - 1)  # never off the grid's edge
        optimal = torch.where(down, 1, 3)
        random = torch.randint(4, (batch_size,), generator=g)
        action = torch.where(torch.rand(batch_size, generator=g) < eps, random, optimal)
        nxt, reward, done = dt_step(pos, action)
        states.append(pos[:, 0] * GRID + pos[:, 1])
        actions.append(torch.where(alive, action, 0))
        rewards.append(torch.where(alive, reward, 0.0))
        valid.append(alive)
        alive = alive & ~done
        pos = nxt
    rewards = torch.stack(rewards, 1)
    rtg = rewards.flip(1).cumsum(1).flip(1)
    timesteps = torch.arange(DT_STEPS).expand(batch_size, -1)
    return rtg[..., None], torch.stack(states, 1), torch.stack(actions, 1), timesteps, torch.stack(valid, 1)


def dt_loss(model: TinyDecisionTransformer, batch) -> torch.Tensor:
    """Cross-entropy of the predicted actions at the valid (non-padding) timesteps, summed and divided by the
    fixed count B·T (DT_STEPS per episode), not by the number of valid steps: the loss is then a mean over
    episodes, so a data-parallel slice holding shorter episodes is weighed as in the whole batch."""
    rtg, states, actions, timesteps, valid = to_model_dtype(model, *batch)
    logits = model(rtg, states, actions, timesteps)
    per_step = F.cross_entropy(logits.flatten(0, 1), actions.flatten(), reduction="none")
    return torch.where(valid.flatten(), per_step, 0.0).sum() / valid.numel()


@torch.no_grad()
def dt_rollout(model: TinyDecisionTransformer, target_return: float, n_episodes: int = 1,
               generator: torch.Generator | None = None):
    """Episodes from the start conditioned on `target_return`: after each move the received reward is subtracted
    from the return-to-go. Actions are greedy, or sampled when a generator is given; an episode that reached the
    goal stays there with reward 0. -> (lengths (B,) with DT_STEPS + 1 for never arriving, rtg (B, T) as fed to
    the model, rewards (B, T))."""
    dtype = model_dtype(model)
    pos = torch.zeros(n_episodes, 2, dtype=torch.int64)
    rtg = torch.full((n_episodes, 1), target_return, dtype=dtype)
    states = torch.zeros(n_episodes, 0, dtype=torch.int64)
    actions, rewards = torch.zeros_like(states), torch.zeros(n_episodes, 0, dtype=dtype)
    lengths = torch.full((n_episodes,), DT_STEPS + 1)
    for t in range(DT_STEPS):
        states = torch.cat([states, (pos[:, 0] * GRID + pos[:, 1])[:, None]], 1)
        placeholder = torch.cat([actions, torch.zeros(n_episodes, 1, dtype=torch.int64)], 1)
        logits = model(rtg[..., None], states, placeholder, torch.arange(t + 1).expand(n_episodes, -1))[:, -1]
        if generator is None:
            action = logits.argmax(-1)
        else:
            action = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
        nxt, reward, done = dt_step(pos, action)
        alive = lengths > DT_STEPS
        reward = torch.where(alive, reward, 0.0).to(dtype)
        pos = torch.where(alive[:, None], nxt, pos)
        lengths = torch.where(done & alive, t + 1, lengths)
        actions, rewards = torch.cat([actions, action[:, None]], 1), torch.cat([rewards, reward[:, None]], 1)
        if t + 1 < DT_STEPS:
            rtg = torch.cat([rtg, rtg[:, -1:] - reward[:, None]], 1)
    return lengths, rtg, rewards


REFERENCE_MODELS = {
    "dqn_gridworld": ReferenceModel(QNetwork, make_transition_batch, dqn_loss),
    "ppo_actor_critic": ReferenceModel(ActorCritic, make_ppo_batch, ppo_rollout_loss),
    "tiny_decision_transformer": ReferenceModel(TinyDecisionTransformer, make_dt_batch, dt_loss),
}
