"""Dual-strategy DRL (DDRL): two relative-entropy-biased actor-critics that move a box onto a tumour.

The WSTS paper, section 3.1.1 and Appendices A-B (../shared/papers/wsts_*.txt).  2D, one slice
at a time, on a square grid of ``size`` pixels (the slice resampled; the paper: 256).

* State: the slice and the hard attention map of the agent's box (1 inside, 0 outside), as in
  the paper, but seen from the box, twice: a wide view centred on the box covering twice the
  image, and a glimpse of ``GLIMPSE`` box sizes around it (see ``render_states``); the box's four
  numbers (centre, width, height / size) also enter the fully connected layers.  Same
  information as the paper's state, but "which way is the tumour" becomes a position in the
  view: a policy network fitted to the true direction learns it in ~100 steps with this view and
  not with the whole-image one (measured on a toy task).
* Action: 4 continuous numbers in [-1, 1] (tanh-squashed Gaussian policy): horizontal and
  vertical translation by up to ``translate`` pixels, width and height change by up to
  ``scale`` pixels (the paper: 0-6 and 0-4 px at 256 px).  Boxes are (cx, cy, w, h) in
  continuous pixel units; pixel i covers [i, i + 1).
* Reward (Eq. 11): ``exp(-d_t / reward_scale)`` when the summed distance ``d`` of the four box
  vertices to the target box's vertices decreased, else 0.  The paper writes ``exp(-d_t)``
  with d in pixels, which is ~0 for any box more than a few pixels off; ``reward_scale``
  (pixels) keeps the reward informative (1 = the paper's formula).  It must stay small
  against the distances an episode covers (about the grid size or less): Eq. 11 pays for
  *any* decrease of d, so with a nearly flat exp(-d / scale) (the recipe once used 4 x the
  grid size) tiny steps towards the tumour that never reach it earn a higher discounted
  return than going there, and the learnt boxes crept, grew or drifted (IoU ~5%).
  ``Testing/test_wsts.py`` checks that reaching the tumour pays more than creeping.
* Each agent (RAC) is SAC-style with a state-value V, an action-value Q and a policy head on
  one small CNN per agent (the paper: a ResNet-18 each; sharing cuts the convolutions to a
  third, see ``RAC``), plus a Polyak target V.  Only the Q loss trains the shared CNN: the V and
  policy heads read detached features.  (With V training it too, the V loss -- whose target
  carries the entropy terms -- swamped the ~0.1 reward differences: the critic ranked "towards
  the tumour" above "away" on 67 % of probe states vs 88-99 % with V detached.)  The
  objective (Eq. 12) adds ``alpha * [H(pi_i) + w_re * KL(pi_i || pi_j)]`` to the reward, with
  the other agent's policy ``pi_j`` as a fixed bias: its value target is (Eq. 13, A.2)
  ``Q_i(s, a) - alpha * log pi_i(a|s) + alpha * w_re * (log pi_i(a|s) - log pi_j(a|s))``,
  ``a ~ pi_i`` (``w_re = 1`` gives the paper's ``Q_i - alpha log pi_j``; ``w_re = 0`` plain SAC);
  Q regresses on ``r + zeta * V_target(s')`` (Eq. 14-15) and the policy minimises the
  corresponding KL to ``exp(Q)`` (Eq. 16-17), the same soft terms included.  The two agents
  are updated alternately (every round, each in turn); the other one is frozen while one
  learns.  The per-sample relative-entropy term is clipped to ``+-kl_clip`` (tanh-Gaussian
  tails make it unbounded).
  The temperature alpha is ``alpha``, tuned automatically towards an entropy of
  ``-action_dim`` (SAC v2) when ``auto_alpha`` is on (the recipe keeps it fixed: the automatic
  one collapsed to ~0.001 and the boxes' sizes then drifted to the 1-pixel minimum).
* Exploring starts (``random_starts``, not in the paper): a share of the training episodes
  starts from a random box, half of them near the slice's tumour, so the memory holds the
  states where the last moves and the box size are learnt.
* Warm start from a greedy expert (``warm_start``, ``SACSettings.expert``; not in the paper).  The
  paper's SAC alone, on a CPU budget, learns boxes that grow over the image (test IoU 3-7 %, recall
  up to 100 %): its critic does not rank "towards the tumour" above "away" reliably (issue 19).  The
  expert (``oracle_actions``) knows the slice's target box -- as the reward does, so only on training
  slices -- and moves the box as far towards it as one step allows.  For the first ``warm_start``
  rounds the agents clone it (squared error of the policy's mean action, the encoder included) on
  DAgger-style episodes that follow the expert with a probability falling from 1 to 0, while the
  critic learns from the same transitions; SAC then takes over with the expert's action as an extra
  policy-loss term of weight ``expert`` (0 = the paper's objective, under which the cloned boxes
  drift: test IoU 0.36 cloning only -> 0.15 cloning 30 % of the rounds then SAC, on the 32-px grid).
  SDDRL clones the same expert actions on its phase.
* Agent 1 starts in the middle of the upper half, agent 2 in the middle of the lower half;
  35 steps an episode; the detection is the union of the final boxes.  A single agent (the
  comparison) starts in the centre.
* Experience replay: one memory per agent of (slice, box, action, reward, next box) tuples;
  states are rendered from the slice stack when sampled, so the memory stays small and one
  memory serves both phases: SDDRL (the student) learns on the plain-phase view of the very
  transitions the teacher made on the enhanced phase ("follows the DDRL's actions step by
  step", same actions, same rewards), optionally with a behaviour-cloning term
  (``imitation``, not in the paper) that makes it copy the teacher's actions faster.

A 3D variant (6 actions, boxes moving through slices) is not implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...learn.modelstore import register_network

ACTION_DIM = 4
STATE_CHANNELS = 4     # (slice, box map) in a wide view and in a glimpse, see ``render_states``
GLIMPSE = 3.0          # the glimpse view spans this many box widths / heights
LOG_STD_RANGE = (-5.0, 2.0)
_EPS = 1e-6


# ----------------------------------------------------------------------------- box geometry


@dataclass
class BoxEnv:
    """Geometry of the box environment on a ``size`` x ``size`` grid (all lengths in pixels)."""
    size: int = 64
    init_box: float = 6.0          # side of the initial square box
    translate: float = 1.5         # max translation per step and axis
    scale: float = 1.0             # max width / height change per step
    episode_steps: int = 35
    reward_scale: float = 4.0      # d is divided by this inside exp(-d) (1 = the paper's formula)
    min_side: float = 1.0

    def starts(self, n_agents: int) -> np.ndarray:
        """(n_agents, 4) start boxes: upper middle and lower middle (one agent: the centre)."""
        s, b = float(self.size), float(self.init_box)
        ys = [s / 2] if n_agents == 1 else list(np.linspace(s / 4, 3 * s / 4, n_agents))
        return np.array([[s / 2, y, b, b] for y in ys], np.float32)

    def step(self, boxes: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Apply actions in [-1, 1]^4 to (N, 4) boxes (cx, cy, w, h); the box stays inside the grid."""
        a = np.clip(np.asarray(actions, np.float32), -1.0, 1.0)
        out = np.asarray(boxes, np.float32).copy()
        out[:, 0:2] += a[:, 0:2] * self.translate
        out[:, 2:4] += a[:, 2:4] * self.scale
        return self.clip(out)

    def clip(self, boxes: np.ndarray) -> np.ndarray:
        s = float(self.size)
        out = np.asarray(boxes, np.float32).copy()
        out[:, 2:4] = np.clip(out[:, 2:4], self.min_side, s)
        out[:, 0:2] = np.clip(out[:, 0:2], out[:, 2:4] / 2, s - out[:, 2:4] / 2)
        return out

    def reward(self, d_prev: np.ndarray, d_new: np.ndarray) -> np.ndarray:
        """Eq. 11: exp(-d_t) when the vertex distance decreased, else 0."""
        return np.where(d_prev - d_new > 0, np.exp(-d_new / self.reward_scale), 0.0).astype(np.float32)


def corners(boxes) -> np.ndarray:
    """(..., 4) (cx, cy, w, h) -> (..., 4) (x0, y0, x1, y1)."""
    b = np.asarray(boxes, np.float32)
    half = b[..., 2:4] / 2
    return np.concatenate([b[..., 0:2] - half, b[..., 0:2] + half], axis=-1)


def from_corners(c) -> np.ndarray:
    c = np.asarray(c, np.float32)
    return np.concatenate([(c[..., 0:2] + c[..., 2:4]) / 2, c[..., 2:4] - c[..., 0:2]], axis=-1)


def vertex_distance(boxes, targets) -> np.ndarray:
    """Sum of the Euclidean distances between the four vertices of each box and its target (Eq. 11's d)."""
    a, b = corners(boxes), corners(targets)
    total = 0.0
    for xi, yi in ((0, 1), (2, 1), (0, 3), (2, 3)):
        total = total + np.hypot(a[..., xi] - b[..., xi], a[..., yi] - b[..., yi])
    return np.asarray(total, np.float32)


def iou(boxes, targets) -> np.ndarray:
    """Intersection over union of continuous boxes (cx, cy, w, h)."""
    a, b = corners(boxes), corners(targets)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    union = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0).astype(np.float32)


def box_recall(boxes, targets) -> np.ndarray:
    """Fraction of each target box covered by the box (the paper's proposal recall)."""
    a, b = corners(boxes), corners(targets)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    area = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return np.where(area > 0, iw * ih / np.maximum(area, 1e-12), 0.0).astype(np.float32)


def oracle_actions(boxes, targets, env: BoxEnv) -> np.ndarray:
    """The greedy expert: per box, the action in [-1, 1]^4 that moves its centre and sides as far
    towards the target box as one step allows (the largest one-step decrease of Eq. 11's d).

    Needs the target box, so it exists only on training slices -- where the reward does too."""
    b, t = np.asarray(boxes, np.float32), np.asarray(targets, np.float32)
    a = np.concatenate([(t[..., 0:2] - b[..., 0:2]) / env.translate, (t[..., 2:4] - b[..., 2:4]) / env.scale], axis=-1)
    return np.clip(a, -1.0, 1.0).astype(np.float32)


def union_boxes(boxes: np.ndarray) -> np.ndarray:
    """(n_agents, N, 4) -> (N, 4): the smallest box holding every agent's box (the DDRL fusion)."""
    c = corners(boxes)
    return from_corners(np.concatenate([c[..., 0:2].min(axis=0), c[..., 2:4].max(axis=0)], axis=-1))


def attention_maps(boxes, height: int, width: int, scale_xy=(1.0, 1.0)) -> np.ndarray:
    """(N, 4) boxes -> (N, height, width) float32 hard attention (1 where the pixel centre is inside).

    ``scale_xy`` maps box units to this grid (e.g. working width / RL size)."""
    c = corners(boxes) * np.array([scale_xy[0], scale_xy[1], scale_xy[0], scale_xy[1]], np.float32)
    xs = np.arange(width, dtype=np.float32) + 0.5
    ys = np.arange(height, dtype=np.float32) + 0.5
    inx = (xs[None, :] >= c[:, 0:1]) & (xs[None, :] <= c[:, 2:3])
    iny = (ys[None, :] >= c[:, 1:2]) & (ys[None, :] <= c[:, 3:4])
    return (iny[:, :, None] & inx[:, None, :]).astype(np.float32)


def jitter_boxes(boxes: np.ndarray, rng: np.random.Generator, shift: float, scale_range, size=None) -> np.ndarray:
    """Random noise on location (+-shift x side) and size (x U(scale_range)): the paper's proposal noise."""
    b = np.asarray(boxes, np.float32).copy()
    n = b.shape[0]
    b[:, 0:2] += rng.uniform(-shift, shift, (n, 2)).astype(np.float32) * b[:, 2:4]
    b[:, 2:4] *= rng.uniform(scale_range[0], scale_range[1], (n, 2)).astype(np.float32)
    b[:, 2:4] = np.maximum(b[:, 2:4], 1.0)
    if size is not None:
        b = BoxEnv(size=int(size)).clip(b)
    return b


# ----------------------------------------------------------------------------- networks


class StateEncoder(nn.Module):
    """Small CNN on the state channels + the 4 box numbers -> features.

    Four 3x3 convolutions, the first ``strided`` of them with stride 2, adaptive average pooling to
    ``pool`` x ``pool`` (keeps where things are), one fully connected layer.  Stands in for the paper's
    ResNet-18 on a CPU budget.  The defaults (4, 4) leave a 32-pixel grid a 2 x 2 map before pooling;
    a finer map did not place the boxes better (cloned detectors, one seed: test IoU 0.36 with (2, 8)
    vs 0.44 with (4, 4) on 32 px, 0.49 with (3, 8) vs 0.52 on 64 px).
    """

    def __init__(self, in_channels: int = STATE_CHANNELS, width: int = 16, features: int = 128, strided: int = 4,
                 pool: int = 4):
        super().__init__()
        chans = [in_channels, width, 2 * width, 2 * width, 2 * width]
        layers = []
        for n, (a, b) in enumerate(zip(chans[:-1], chans[1:])):
            layers += [nn.Conv2d(a, b, 3, stride=2 if n < strided else 1, padding=1), nn.ReLU(inplace=True)]
        self.conv = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(pool), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(chans[-1] * pool * pool + 4, features), nn.ReLU(inplace=True))
        self.out_features = features
        self.strided, self.pool = int(strided), int(pool)

    def forward(self, state: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.conv(state), box], dim=1))


@register_network("BoxPolicy2D")
class PolicyNet(nn.Module):
    """Strategy network: state -> mean and log standard deviation of a tanh-squashed Gaussian.

    Owns the agent's CNN encoder (the value heads share it while training), so a saved policy
    is self-contained for inference.
    """

    def __init__(self, in_channels: int = STATE_CHANNELS, width: int = 16, features: int = 128, action_dim: int = ACTION_DIM,
                 strided: int = 4, pool: int = 4):
        super().__init__()
        self.encoder = StateEncoder(in_channels, width, features, strided, pool)
        self.head = nn.Sequential(nn.Linear(features, features), nn.ReLU(inplace=True), nn.Linear(features, 2 * action_dim))
        self.action_dim = action_dim

    def dist(self, feats):
        mean, log_std = self.head(feats).chunk(2, dim=1)
        return mean, log_std.clamp(*LOG_STD_RANGE)

    def forward(self, state, box):
        return self.dist(self.encoder(state, box))

    def sample_features(self, feats, deterministic: bool = False):
        """(action in [-1, 1], log-probability) with the reparameterisation trick."""
        mean, log_std = self.dist(feats)
        if deterministic:
            a = torch.tanh(mean)
            return a, tanh_gaussian_log_prob(mean, log_std, a)
        u = mean + log_std.exp() * torch.randn_like(mean)
        a = torch.tanh(u)
        logp = _normal_log_prob(u, mean, log_std) - torch.log1p(-a.pow(2) + _EPS).sum(dim=1)
        return a, logp

    def sample(self, state, box, deterministic: bool = False):
        return self.sample_features(self.encoder(state, box), deterministic)

    def log_prob_features(self, feats, action):
        mean, log_std = self.dist(feats)
        return tanh_gaussian_log_prob(mean, log_std, action)

    def log_prob(self, state, box, action):
        return self.log_prob_features(self.encoder(state, box), action)


def _normal_log_prob(u, mean, log_std):
    return (-0.5 * ((u - mean) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(dim=1)


def tanh_gaussian_log_prob(mean, log_std, action):
    """log pi(a) of a tanh-squashed Gaussian at a given action (inverse tanh, Jacobian corrected)."""
    a = action.clamp(-1 + 1e-4, 1 - 1e-4)
    u = torch.atanh(a)
    return _normal_log_prob(u, mean, log_std) - torch.log1p(-a.pow(2) + _EPS).sum(dim=1)


class QHead(nn.Module):
    """Action-value head: state features concatenated with the action -> Q."""

    def __init__(self, features=128, action_dim=ACTION_DIM):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features + action_dim, features), nn.ReLU(inplace=True),
                                 nn.Linear(features, 1))

    def forward(self, feats, action):
        return self.net(torch.cat([feats, action], dim=1)).squeeze(1)


class VNet(nn.Module):
    """State-value network (encoder + head): the target V keeps its own Polyak copy of both."""

    def __init__(self, encoder: nn.Module, features=128):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(features, 1)

    def forward(self, state, box):
        return self.head(self.encoder(state, box)).squeeze(1)


class RAC(nn.Module):
    """One relative-entropy-biased actor-critic: policy, Q and V heads on one CNN, target V, temperature.

    The paper (Appendix B) gives V, Q and the policy each a ResNet-18; here they share one
    small encoder per agent, trained by the Q loss only, the policy and V heads reading
    detached features (as in SAC from pixels, SAC-AE / DrQ): a third of the convolutions.
    """

    def __init__(self, width: int = 16, features: int = 128, alpha: float = 1.0, strided: int = 4, pool: int = 4):
        super().__init__()
        self.pi = PolicyNet(STATE_CHANNELS, width, features, strided=strided, pool=pool)
        self.q = QHead(features)
        self.v = nn.Linear(features, 1)
        self.v_target = VNet(StateEncoder(STATE_CHANNELS, width, features, strided, pool), features)
        self.v_target.encoder.load_state_dict(self.pi.encoder.state_dict())
        self.v_target.head.load_state_dict(self.v.state_dict())
        self.v_target.requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(max(alpha, 1e-8)), dtype=torch.float32))

    @property
    def encoder(self) -> StateEncoder:
        return self.pi.encoder

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    def policy_kwargs(self) -> dict:
        enc = self.pi.encoder
        return {"in_channels": STATE_CHANNELS, "width": enc.conv[0].out_channels, "features": enc.out_features,
                "action_dim": self.pi.action_dim, "strided": enc.strided, "pool": enc.pool}

    def make_optimizers(self, lr: float, alpha_lr: float | None = None) -> dict:
        critic = list(self.pi.encoder.parameters()) + list(self.q.parameters()) + list(self.v.parameters())
        return {"critic": torch.optim.Adam(critic, lr=lr),
                "pi": torch.optim.Adam(self.pi.head.parameters(), lr=lr),
                "alpha": torch.optim.Adam([self.log_alpha], lr=lr if alpha_lr is None else alpha_lr)}


# ----------------------------------------------------------------------------- replay memory


class ReplayMemory(nn.Module):
    """Ring buffer of (slice, box, action, reward, next box) as module buffers (checkpointable)."""

    def __init__(self, capacity: int):
        super().__init__()
        capacity = int(capacity)
        self.register_buffer("slice", torch.zeros(capacity, dtype=torch.int64))
        self.register_buffer("box", torch.zeros(capacity, 4))
        self.register_buffer("action", torch.zeros(capacity, ACTION_DIM))
        self.register_buffer("reward", torch.zeros(capacity))
        self.register_buffer("next_box", torch.zeros(capacity, 4))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))   # transitions ever pushed

    @property
    def capacity(self) -> int:
        return int(self.slice.shape[0])

    def __len__(self) -> int:
        return min(int(self.count), self.capacity)

    def push(self, slices, boxes, actions, rewards, next_boxes) -> None:
        n = len(slices)
        idx = (int(self.count) + np.arange(n)) % self.capacity
        idx = torch.from_numpy(idx)
        self.slice[idx] = torch.as_tensor(np.asarray(slices), dtype=torch.int64)
        self.box[idx] = torch.as_tensor(np.asarray(boxes, np.float32))
        self.action[idx] = torch.as_tensor(np.asarray(actions, np.float32))
        self.reward[idx] = torch.as_tensor(np.asarray(rewards, np.float32))
        self.next_box[idx] = torch.as_tensor(np.asarray(next_boxes, np.float32))
        self.count += n

    def sample(self, batch: int, rng: np.random.Generator) -> dict:
        idx = torch.from_numpy(rng.integers(0, len(self), int(batch)))
        return {k: getattr(self, k)[idx] for k in ("slice", "box", "action", "reward", "next_box")}


# ----------------------------------------------------------------------------- states


def render_states(images: torch.Tensor, slices: torch.Tensor, boxes: torch.Tensor) -> tuple:
    """(slice stack (S, H, W) on the RL grid, slice indices (B,), boxes (B, 4)) -> (states (B, 4, H, W), box vectors (B, 4)).

    The state is the slice and the box's hard attention map (the paper's two channels) seen
    from the box, twice: a view of a window twice the image size centred on the box (zero
    outside the image, half resolution), so the whole image is always visible and "where the
    tumour lies relative to my box" is a position in the view; and a glimpse of ``GLIMPSE``
    box sizes around the box at full resolution, where the box edges and the tumour's edges
    can be compared (the wide view shows a 3-pixel tumour as one or two pixels).  Measured
    effect on one 1000-step single-agent run: none beyond noise (test IoU 0.176 -> 0.173,
    training IoU 0.086 -> 0.148); kept for the box-size decisions, the agents' weakest part.
    """
    h, w = images.shape[-2:]
    img = images[slices]
    b = boxes.to(img.device, torch.float32)
    att = torch.from_numpy(attention_maps(boxes.cpu().numpy(), h, w)).to(img.device)
    x = torch.stack([img, att], dim=1)
    views = []
    for span_x, span_y in ((torch.full_like(b[:, 2], 2.0 * w), torch.full_like(b[:, 3], 2.0 * h)),
                           (GLIMPSE * b[:, 2], GLIMPSE * b[:, 3])):
        theta = torch.zeros(len(b), 2, 3, device=img.device)
        theta[:, 0, 0] = span_x / w                       # the view spans span_x grid pixels
        theta[:, 1, 1] = span_y / h
        theta[:, 0, 2] = b[:, 0] / w * 2 - 1              # centred on the box
        theta[:, 1, 2] = b[:, 1] / h * 2 - 1
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        views.append(F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    return torch.cat(views, dim=1), b / float(w)


# ----------------------------------------------------------------------------- learning


@dataclass
class SACSettings:
    zeta: float = 0.99                 # discount (the paper's zeta)
    tau: float = 0.005                 # Polyak rate of the target V
    relative_entropy: float = 1.0      # w_re: 1 = DDRL, 0 = plain SAC
    kl_clip: float = 5.0
    auto_alpha: bool = True
    target_entropy: float = -float(ACTION_DIM)
    imitation: float = 0.0             # behaviour cloning of the memory's actions (the student)
    actor_grad: bool = False           # let the policy loss train the shared encoder too
    expert: float = 0.0                # weight of the greedy expert's action in the policy loss (0 = the paper)


def _frozen(module: nn.Module):
    class _Ctx:
        def __enter__(self):
            self.flags = [p.requires_grad for p in module.parameters()]
            module.requires_grad_(False)

        def __exit__(self, *exc):
            for p, f in zip(module.parameters(), self.flags):
                p.requires_grad_(f)
    return _Ctx()


def soft_bonus(logp: torch.Tensor, logp_other: torch.Tensor | None, alpha, s: SACSettings) -> torch.Tensor:
    """alpha * [entropy + w_re * relative entropy] per sample: -alpha log pi_i + alpha w_re (log pi_i - log pi_j)."""
    bonus = -alpha * logp
    if logp_other is not None and s.relative_entropy:
        bonus = bonus + alpha * s.relative_entropy * (logp - logp_other).clamp(-s.kl_clip, s.kl_clip)
    return bonus


def expert_loss(pi: PolicyNet, feats: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """Behaviour cloning of the greedy expert: squared error of the policy's mean action (tanh of the mean).

    Not the log-likelihood: the expert's actions are often at the +-1 limits, where a tanh-Gaussian's
    density is unbounded and its log-likelihood drives the mean to infinity."""
    mean, _ = pi.dist(feats)
    return (torch.tanh(mean) - expert).pow(2).sum(dim=1).mean()


def rac_update(agent: RAC, opts: dict, batch: dict, images: torch.Tensor, s: SACSettings,
               other: RAC | None = None, expert: torch.Tensor | None = None, warm: bool = False) -> dict:
    """One gradient step of the critic (V, Q), the policy and the temperature of ``agent`` (Eq. 13-17).

    ``other`` (frozen) provides the relative-entropy bias ``log pi_j(a|s)``.  ``expert``: the greedy
    expert's actions at the batch's states; with ``warm`` (the warm start) the policy -- encoder
    included -- learns by cloning them alone while the critic learns as usual, otherwise they add
    ``s.expert`` x the cloning loss to the policy loss.
    """
    dev = next(agent.parameters()).device
    state, vec = render_states(images, batch["slice"].to(dev), batch["box"])
    state2, vec2 = render_states(images, batch["slice"].to(dev), batch["next_box"])
    action, reward = batch["action"].to(dev), batch["reward"].to(dev)
    alpha = agent.alpha.detach()

    feats = agent.encoder(state, vec)
    q_pred = agent.q(feats, action)
    with torch.no_grad():
        q_hat = reward + s.zeta * agent.v_target(state2, vec2)          # Eq. 15

    # a fresh action of the agent's own strategy; the other strategy's log-density is the bias
    a_new, logp = agent.pi.sample_features(feats if s.actor_grad else feats.detach())
    logp_other = None
    if other is not None:
        with _frozen(other.pi):
            logp_other = other.pi.log_prob(state, vec, a_new)
    with _frozen(agent.q):
        q_new = agent.q(feats.detach(), a_new)
    bonus = soft_bonus(logp, logp_other, alpha, s)

    q_loss = 0.5 * (q_pred - q_hat).pow(2).mean()                                    # Eq. 14
    v_loss = 0.5 * (agent.v(feats.detach()).squeeze(1) - (q_new + bonus).detach()).pow(2).mean()   # Eq. 13 / A.5
    pi_loss = -(q_new + bonus).mean()                                               # Eq. 16-17 (+ Eq. 12's terms)
    ex = torch.zeros((), device=dev)
    if expert is not None and (warm or s.expert):
        ex = expert_loss(agent.pi, feats if warm else feats.detach(), expert.to(dev))
        pi_loss = ex if warm else pi_loss + s.expert * ex
    bc = torch.zeros((), device=dev)
    if s.imitation and not warm:
        bc = -agent.pi.log_prob_features(feats.detach(), action).mean()
        pi_loss = pi_loss + s.imitation * bc
    opts["critic"].zero_grad(set_to_none=True)
    opts["pi"].zero_grad(set_to_none=True)
    (q_loss + v_loss + pi_loss).backward()        # disjoint parameters: critic <- q/v losses, policy head <- pi loss
    opts["critic"].step()
    opts["pi"].step()

    if s.auto_alpha and not warm:
        a_loss = -(agent.log_alpha * (logp.detach() + s.target_entropy)).mean()
        opts["alpha"].zero_grad(set_to_none=True)
        a_loss.backward()
        opts["alpha"].step()

    with torch.no_grad():
        pairs = list(zip(agent.pi.encoder.parameters(), agent.v_target.encoder.parameters())) + \
            list(zip(agent.v.parameters(), agent.v_target.head.parameters()))
        for p, pt in pairs:
            pt.mul_(1 - s.tau).add_(p, alpha=s.tau)
    out = {"q": float(q_loss.detach()), "v": float(v_loss.detach()), "pi": float(pi_loss.detach()),
           "alpha": float(alpha), "entropy": float(-logp.detach().mean())}
    if logp_other is not None:
        out["kl"] = float((logp - logp_other).detach().mean())
    if s.imitation and not warm:
        out["bc"] = float(bc.detach())
    if expert is not None and (warm or s.expert):
        out["expert"] = float(ex.detach())
    return out


def policy_kl(pi_a: PolicyNet, pi_b: PolicyNet, images: torch.Tensor, slices, boxes, samples: int = 8) -> float:
    """Monte-Carlo KL(pi_a || pi_b) averaged over the given states (how far apart two strategies are)."""
    with torch.no_grad():
        state, vec = render_states(images, torch.as_tensor(slices), torch.as_tensor(np.asarray(boxes, np.float32)))
        total = 0.0
        for _ in range(samples):
            a, logp = pi_a.sample(state, vec)
            total += float((logp - pi_b.log_prob(state, vec, a)).mean())
    return total / samples


# ----------------------------------------------------------------------------- inference


@torch.no_grad()
def run_policy(pi: PolicyNet, images: torch.Tensor, start: np.ndarray, env: BoxEnv, slices=None,
               deterministic: bool = True, batch: int = 256) -> np.ndarray:
    """Roll one agent for ``env.episode_steps`` from ``start`` (4,) on every slice -> final boxes (N, 4)."""
    dev = next(pi.parameters()).device
    slices = np.arange(images.shape[0]) if slices is None else np.asarray(slices)
    out = np.empty((len(slices), 4), np.float32)
    was_training = pi.training
    pi.eval()
    for b0 in range(0, len(slices), batch):
        idx = slices[b0:b0 + batch]
        boxes = np.repeat(np.asarray(start, np.float32)[None], len(idx), axis=0)
        sl = torch.from_numpy(idx).to(dev)
        for _ in range(env.episode_steps):
            state, vec = render_states(images, sl, torch.from_numpy(boxes))
            a, _ = pi.sample(state, vec, deterministic=deterministic)
            boxes = env.step(boxes, a.cpu().numpy())
        out[b0:b0 + len(idx)] = boxes
    pi.train(was_training)
    return out


def detect(policies, images: torch.Tensor, env: BoxEnv, slices=None) -> tuple:
    """Every agent from its start position -> (union boxes (N, 4), per-agent boxes (n_agents, N, 4))."""
    starts = env.starts(len(policies))
    per_agent = np.stack([run_policy(pi, images, starts[i], env, slices) for i, pi in enumerate(policies)])
    return union_boxes(per_agent), per_agent


# ----------------------------------------------------------------------------- training loop


class DetectorTrainer:
    """DDRL (or a single agent) acting on one phase, optionally with an SDDRL imitator on another.

    ``images``: {phase: (S, size, size) float32 slice stack}; ``targets`` (S, 4) the tumour box
    of each slice; the ``act_phase`` agents explore with their own stochastic policies, the
    ``imitate_phase`` agents (when given) learn from the same transitions seen on their phase.
    """

    def __init__(self, images: dict, targets: np.ndarray, env: BoxEnv, n_agents: int, settings: SACSettings,
                 rng: np.random.Generator, act_phase: str, imitate_phase: str | None = None, lr: float = 1e-3,
                 student_lr: float = 1e-4, memory: int = 20000, batch: int = 80, n_envs: int = 8,
                 width: int = 16, features: int = 128, alpha: float = 1.0, alpha_lr: float | None = None,
                 device="cpu", student_settings: SACSettings | None = None, updates: int = 1,
                 random_starts: float = 0.0, warm_start: int = 0, strided: int = 4, pool: int = 4):
        self.updates = int(updates)      # gradient rounds per environment step (update-to-data ratio)
        # rounds of behaviour cloning of the greedy expert before SAC (0 = the paper: SAC from the start).
        # DAgger-style: the episodes follow the expert with a probability falling from 1 to 0 over these
        # rounds, else the agent's own policy, so the states cloned are the ones the agent will visit
        self.warm_start = int(warm_start)
        # share of training episodes that start off the fixed start positions (exploring starts): with
        # fixed starts alone the memory holds few states near a tumour, where the fine moves are learnt
        self.random_starts = float(random_starts)
        self.dev = torch.device(device)
        self.images = {k: torch.as_tensor(v, dtype=torch.float32).to(self.dev) for k, v in images.items()}
        self.targets = np.asarray(targets, np.float32)
        self.env, self.n_agents, self.s, self.rng = env, int(n_agents), settings, rng
        self.s_student = student_settings or settings
        self.act_phase, self.imitate_phase = act_phase, imitate_phase
        self.batch, self.n_envs = int(batch), int(n_envs)
        self.teacher = nn.ModuleList(RAC(width, features, alpha, strided, pool) for _ in range(self.n_agents)).to(self.dev)
        self.student = None
        if imitate_phase is not None:
            self.student = nn.ModuleList(RAC(width, features, alpha, strided, pool)
                                         for _ in range(self.n_agents)).to(self.dev)
        self.memory = nn.ModuleList(ReplayMemory(memory) for _ in range(self.n_agents))
        self.opts = {f"teacher{i}_{k}": o for i, rac in enumerate(self.teacher) for k, o in rac.make_optimizers(lr, alpha_lr).items()}
        if self.student is not None:
            self.opts.update({f"student{i}_{k}": o for i, rac in enumerate(self.student)
                              for k, o in rac.make_optimizers(student_lr, alpha_lr).items()})
        self._envs = None

    # -- bookkeeping for checkpoints
    def modules(self) -> dict:
        out = {"det_teacher": self.teacher, "det_memory": self.memory}
        if self.student is not None:
            out["det_student"] = self.student
        return out

    def _opts_of(self, role: str, i: int) -> dict:
        return {k: self.opts[f"{role}{i}_{k}"] for k in ("critic", "pi", "alpha")}

    def set_lr(self, teacher_lr: float, student_lr: float) -> None:
        for name, opt in self.opts.items():
            if name.endswith("_alpha"):
                continue
            for g in opt.param_groups:
                g["lr"] = teacher_lr if name.startswith("teacher") else student_lr

    # -- environment
    def _reset(self, n: int) -> dict:
        sl = self.rng.integers(0, len(self.targets), n)
        boxes = np.repeat(self.env.starts(self.n_agents)[:, None], n, axis=1)   # (agents, n, 4)
        explore = self.rng.random(n) < self.random_starts
        if explore.any():
            boxes[:, explore] = self._exploring_starts(sl[explore])
        return {"slice": sl, "boxes": boxes, "t": np.zeros(n, np.int64)}

    def _exploring_starts(self, slices: np.ndarray) -> np.ndarray:
        """(agents, n, 4) start boxes off the fixed start positions: half anywhere (side 0.5-2 x the start
        box), half within 1.5 tumour sizes of the slice's tumour (side 0.5-2 x the tumour's)."""
        a, n, env = self.n_agents, len(slices), self.env
        centre = self.rng.uniform(0, env.size, (a, n, 2))
        side = self.rng.uniform(0.5, 2.0, (a, n, 2)) * env.init_box
        target = np.broadcast_to(self.targets[slices], (a, n, 4))
        near = (self.rng.random(n) < 0.5)[None, :, None]
        centre = np.where(near, target[..., :2] + self.rng.uniform(-1.5, 1.5, (a, n, 2)) * target[..., 2:], centre)
        side = np.where(near, target[..., 2:] * self.rng.uniform(0.5, 2.0, (a, n, 2)), side)
        boxes = np.concatenate([centre, side], axis=-1).astype(np.float32).reshape(-1, 4)
        return env.clip(boxes).reshape(a, n, 4)

    def warm(self, round_index: int | None) -> bool:
        return round_index is not None and round_index < self.warm_start

    def env_step(self, round_index: int | None = None) -> float:
        """Every parallel episode advances one step for every agent; transitions go to the memories.

        During the warm start a share of the episodes' moves (falling from all to none) are the expert's."""
        if self._envs is None:
            self._envs = self._reset(self.n_envs)
        e = self._envs
        img = self.images[self.act_phase]
        sl = torch.from_numpy(e["slice"]).to(self.dev)
        target = self.targets[e["slice"]]
        mean_r = 0.0
        for i, rac in enumerate(self.teacher):
            boxes = e["boxes"][i]
            with torch.no_grad():
                state, vec = render_states(img, sl, torch.from_numpy(boxes))
                a, _ = rac.pi.sample(state, vec)
            a = a.cpu().numpy()
            if self.warm(round_index):
                follow = self.rng.random(len(a)) < 1.0 - round_index / self.warm_start
                a = np.where(follow[:, None], oracle_actions(boxes, target, self.env), a)
            new = self.env.step(boxes, a)
            r = self.env.reward(vertex_distance(boxes, target), vertex_distance(new, target))
            self.memory[i].push(e["slice"], boxes, a, r, new)
            e["boxes"][i] = new
            mean_r += float(r.mean()) / self.n_agents
        e["t"] += 1
        done = e["t"] >= self.env.episode_steps
        if done.any():
            fresh = self._reset(int(done.sum()))
            e["slice"][done], e["t"][done] = fresh["slice"], 0
            e["boxes"][:, done] = fresh["boxes"]
        return mean_r

    def update(self, round_index: int) -> dict:
        """Alternate updates: every agent in turn (the others frozen), teacher agents then student agents."""
        if len(self.memory[0]) < self.batch:
            return {}
        logs = {}
        share = self.n_agents * self.updates
        warm = self.warm(round_index)
        for i in [i for _ in range(self.updates) for i in range(self.n_agents)]:
            other = (i + 1) % self.n_agents if self.n_agents > 1 else None
            batch = self.memory[i].sample(self.batch, self.rng)
            expert = None
            if warm or self.s.expert or self.s_student.expert:
                expert = torch.from_numpy(oracle_actions(batch["box"].numpy(), self.targets[batch["slice"].numpy()],
                                                         self.env))
            t = rac_update(self.teacher[i], self._opts_of("teacher", i), batch, self.images[self.act_phase], self.s,
                           self.teacher[other] if other is not None else None, expert, warm)
            for k, v in t.items():
                logs[f"t_{k}"] = logs.get(f"t_{k}", 0.0) + v / share
            if self.student is not None:
                st = rac_update(self.student[i], self._opts_of("student", i), batch, self.images[self.imitate_phase],
                                self.s_student, self.student[other] if other is not None else None, expert, warm)
                for k, v in st.items():
                    logs[f"s_{k}"] = logs.get(f"s_{k}", 0.0) + v / share
        return logs

    def policies(self, role: str = "teacher") -> list:
        racs = self.teacher if role == "teacher" else self.student
        return [rac.pi for rac in racs]
