"""Recipe wsts (enhanced-phase teacher, non-enhanced student): DDRL, USSE, student, model round trip.

Tiny sizes throughout: the point is behaviour (the relative-entropy term pushes the two
policies apart, the uncertainty mask drops the most uncertain pixels, EMA moves the target,
the student reads the plain phase alone), not accuracy.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from WeakLiverSegLib.recipes.wsts import rl_boxes as R
from WeakLiverSegLib.recipes.wsts import usse as U
from WeakLiverSegLib.errors import InputError

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: threads only add contention on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = {
    "spacing_mm": 3.0, "checkpoint_every": 1000,
    "network": {"stem": 4, "growth": 4, "layers": 1, "levels": 2},
    "detector": {"size": 16, "steps": 12, "envs": 4, "batch": 8, "memory": 64, "width": 4, "features": 16,
                 "episode_steps": 5},
    "usse": {"steps": 3, "batch": 2},
    "student": {"steps": 3, "batch": 2},
}


# ----------------------------------------------------------------------------- DDRL


def test_box_env_reward_and_geometry():
    env = R.BoxEnv(size=32, init_box=4, translate=2, scale=1, reward_scale=8)
    starts = env.starts(2)
    assert starts[0, 1] < 16 < starts[1, 1] and np.all(starts[:, 0] == 16)      # upper / lower middle
    target = np.array([[10.0, 10.0, 6.0, 4.0]], np.float32)
    assert R.vertex_distance(target, target)[0] == 0
    far = np.array([[20.0, 20.0, 6.0, 4.0]], np.float32)
    near = np.array([[12.0, 11.0, 6.0, 4.0]], np.float32)
    d_far, d_near = R.vertex_distance(far, target), R.vertex_distance(near, target)
    assert env.reward(d_far, d_near)[0] == pytest.approx(np.exp(-d_near[0] / 8))   # improvement: exp(-d)
    assert env.reward(d_near, d_far)[0] == 0                                        # worse: 0
    assert env.reward(d_near, R.vertex_distance(target, target))[0] == pytest.approx(1.0)   # on target: 1
    moved = env.step(near, np.array([[1.0, -1.0, 1.0, -1.0]]))
    assert np.allclose(moved, [[14.0, 9.0, 7.0, 3.0]])
    clipped = env.step(np.array([[1.0, 1.0, 2.0, 2.0]]), np.array([[-1, -1, 0, 0]]))
    assert np.all(R.corners(clipped)[:, :2] >= 0)                                   # stays on the grid
    union = R.union_boxes(np.stack([np.array([[4.0, 4.0, 2.0, 2.0]]), np.array([[10.0, 8.0, 2.0, 4.0]])]))
    assert np.allclose(R.corners(union), [[3.0, 3.0, 11.0, 10.0]])
    assert R.iou(target, target)[0] == pytest.approx(1.0) and R.iou(target, far)[0] == 0
    att = R.attention_maps(target, 32, 32)[0]
    assert att.sum() == 6 * 4 and att[10, 10] == 1 and att[0, 0] == 0


def _replay(rng, n_slices=4, size=16, n=64):
    images = torch.from_numpy(rng.random((n_slices, size, size)).astype(np.float32))
    mem = R.ReplayMemory(n)
    boxes = np.tile(np.array([[8.0, 8.0, 4.0, 4.0]], np.float32), (n, 1))
    boxes[:, :2] += rng.uniform(-3, 3, (n, 2)).astype(np.float32)
    actions = rng.uniform(-1, 1, (n, 4)).astype(np.float32)
    mem.push(rng.integers(0, n_slices, n), boxes, actions, rng.random(n).astype(np.float32), boxes)
    return images, mem, boxes


def _train_pair(relative_entropy: float, updates: int = 30) -> float:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images, mem, boxes = _replay(rng)
    first = R.RAC(width=4, features=16, alpha=0.5)
    agents = [first, copy.deepcopy(first)]            # identical strategies at the start
    opts = [a.make_optimizers(3e-3) for a in agents]
    s = R.SACSettings(relative_entropy=relative_entropy, auto_alpha=False)
    assert R.policy_kl(agents[0].pi, agents[1].pi, images, np.zeros(8, int), boxes[:8]) == pytest.approx(0, abs=1e-4)
    for step in range(updates):
        i = step % 2                                  # alternate updates, the other agent frozen
        before = [p.detach().clone() for p in agents[1 - i].parameters()]
        R.rac_update(agents[i], opts[i], mem.sample(16, rng), images, s, other=agents[1 - i])
        assert all(torch.equal(a, b) for a, b in zip(before, agents[1 - i].parameters()))
    sl = np.arange(4).repeat(4)
    return R.policy_kl(agents[0].pi, agents[1].pi, images, sl, boxes[:16], samples=16)


def _discounted_return(env, policy, target, zeta) -> tuple:
    """(discounted Eq. 11 return, final IoU) of one episode from the single-agent start box."""
    box, total = env.starts(1), 0.0
    for t in range(env.episode_steps):
        new = env.step(box, policy(box))
        total += zeta ** t * float(env.reward(R.vertex_distance(box, target), R.vertex_distance(new, target))[0])
        box = new
    return total, float(R.iou(box, target)[0])


@pytest.mark.parametrize("size", [32, 64])
def test_recipe_reward_pays_more_for_reaching_the_tumour_than_for_creeping(size):
    """Eq. 11 only rewards *that* d decreased; if exp(-d_t / scale) is nearly flat (a large scale), tiny
    improving steps that never reach the tumour earn a higher return than going there, so the optimal
    policy does not localise (the detectors' IoU stayed at a few %)."""
    from WeakLiverSegLib.recipes import wsts

    cfg = wsts.resolve_config({"detector": {"size": size}})
    env, zeta = wsts.box_env(cfg), cfg["detector"]["zeta"]
    moves = np.array(np.meshgrid(*[np.linspace(-1, 1, 3)] * 4)).reshape(4, -1).T.astype(np.float32)
    for target in (np.array([[0.75, 0.25, 0.25, 0.25]]), np.array([[0.3, 0.7, 0.15, 0.2]])):
        target = (target * size).astype(np.float32)

        def greedy(box):   # the move that most decreases the vertex distance
            d = R.vertex_distance(env.step(np.repeat(box, len(moves), 0), moves), np.repeat(target, len(moves), 0))
            return moves[None, int(np.argmin(d))]

        reach, reach_iou = _discounted_return(env, greedy, target, zeta)
        creep, creep_iou = _discounted_return(env, lambda box: 0.02 * greedy(box), target, zeta)
        assert reach_iou > 0.7 and creep_iou < 0.1
        assert reach > 1.5 * creep, (reach, creep)


def test_relative_entropy_moves_the_two_policies_apart():
    plain = _train_pair(0.0, 60)
    biased = _train_pair(1.0, 60)
    assert biased > 5 * plain and biased > 0.03, (plain, biased)


def test_relative_entropy_bias_has_the_papers_sign_and_is_bounded():
    """Eq. 13 / A.5: within the clip the soft bonus is -alpha log pi_j (own entropy and KL cancel); however far
    apart the strategies drift (the logged KL reached ~50 on the phantom) it stays within alpha * kl_clip of
    plain SAC's entropy bonus."""
    s = R.SACSettings(relative_entropy=1.0, kl_clip=5.0)
    logp, logp_other = torch.tensor([0.5, -1.0, 60.0, 2.0]), torch.tensor([-0.5, -2.0, -40.0, 80.0])
    bonus = R.soft_bonus(logp, logp_other, 0.3, s)
    assert torch.allclose(bonus[:2], -0.3 * logp_other[:2])                        # the paper's -alpha log pi_j
    plain = R.soft_bonus(logp, None, 0.3, s)
    assert torch.all((bonus - plain).abs() <= 0.3 * 5.0 + 1e-6)                    # bounded bias
    assert torch.equal(R.soft_bonus(logp, logp_other, 0.3, R.SACSettings(relative_entropy=0.0)), plain)


def test_detector_updates_per_environment_step():
    """``updates`` gradient rounds per environment step (the update-to-data ratio), every agent each round."""
    from WeakLiverSegLib.recipes import wsts

    rng = np.random.default_rng(0)
    images = {"enhanced": rng.random((3, 16, 16)).astype(np.float32)}
    targets = np.array([[5.0, 5.0, 3.0, 3.0]] * 3, np.float32)
    counts = {}
    for updates in (1, 3):
        cfg = wsts.resolve_config({"detector": {**TINY["detector"], "updates": updates}})
        det = wsts.make_detector(cfg, images, targets, np.random.default_rng(0), "cpu", "enhanced", None)
        for step in range(3):
            det.env_step()
            det.update(step)
        critic = [o for k, o in det.opts.items() if k.endswith("_critic")]
        counts[updates] = [int(next(iter(o.state_dict()["state"].values()))["step"]) for o in critic]   # Adam steps
    assert counts[3] == [3 * c for c in counts[1]] and min(counts[1]) > 0, counts
    with pytest.raises(InputError, match="detector.updates"):
        wsts.resolve_config({"detector": {"updates": 0}})


def test_greedy_expert_reaches_the_tumour_and_each_move_lowers_the_distance():
    """The expert that the warm start clones: every move decreases Eq. 11's d (so earns a reward) until the
    box sits on the target; from the fixed start it reaches the tumour within an episode."""
    env = R.BoxEnv(size=32, init_box=3, translate=0.75, scale=0.5, episode_steps=35)
    target = np.array([[22.0, 9.0, 8.0, 6.0]], np.float32)
    box = env.starts(1)
    for _ in range(env.episode_steps):
        a = R.oracle_actions(box, target, env)
        assert np.all(np.abs(a) <= 1)
        new = env.step(box, a)
        assert R.vertex_distance(new, target)[0] <= R.vertex_distance(box, target)[0] + 1e-5
        box = new
    assert R.iou(box, target)[0] > 0.95
    # on target the expert stands still
    assert np.allclose(R.oracle_actions(target, target, env), 0)


def test_warm_start_clones_the_expert_then_hands_over_to_sac():
    """The ``warm_start`` share of the rounds: the episodes follow the expert (all its moves at round 0), the
    policy learns by cloning it and its loss falls; afterwards the updates are SAC's again (no cloning term at
    ``expert`` 0, the paper's objective; a cloning term beside SAC's at ``expert`` > 0)."""
    from WeakLiverSegLib.recipes import wsts

    rng = np.random.default_rng(0)
    targets = np.array([[5.0, 5.0, 4.0, 4.0], [11.0, 4.0, 3.0, 5.0], [8.0, 12.0, 5.0, 3.0], [4.0, 11.0, 4.0, 4.0]],
                       np.float32)
    bright = R.attention_maps(targets, 16, 16)                 # the tumour: a bright square inside its box
    images = {p: (0.2 * rng.random((4, 16, 16)) + c * bright).astype(np.float32)
              for p, c in (("enhanced", 1.0), ("plain", 0.5))}
    cfg = wsts.resolve_config({"detector": {**TINY["detector"], "steps": 400, "warm_start": 0.5, "expert": 0.0,
                                            "memory": 2000, "random_starts": 0.5, "batch": 32, "width": 8,
                                            "features": 32}})
    torch.manual_seed(0)
    det = wsts.make_detector(cfg, images, targets, np.random.default_rng(0), "cpu", "enhanced", "plain")
    det._envs = det._reset(det.n_envs)
    boxes = det._envs["boxes"][0].copy()
    det.env_step(0)                                   # round 0: every move is the expert's
    expert = R.oracle_actions(boxes, targets[det._envs["slice"]], det.env)
    assert np.allclose(det.memory[0].action[:det.n_envs].numpy(), expert)
    probe = det._exploring_starts(np.repeat(np.arange(4), 16))[0]          # 64 fixed states to judge the cloning by
    probe_sl = torch.from_numpy(np.repeat(np.arange(4), 16))

    def cloning_error(role):
        rac = (det.teacher if role == "teacher" else det.student)[0]
        img = det.images["enhanced" if role == "teacher" else "plain"]
        with torch.no_grad():
            state, vec = R.render_states(img, probe_sl, torch.from_numpy(probe))
            expert = torch.from_numpy(R.oracle_actions(probe, targets[probe_sl.numpy()], det.env))
            return float(R.expert_loss(rac.pi, rac.encoder(state, vec), expert))

    before = [cloning_error("teacher"), cloning_error("student")]
    for step in range(1, 200):
        det.env_step(step)
        logs = det.update(step)
        if logs:
            assert "t_expert" in logs and "s_expert" in logs and "t_bc" not in logs
    after_warm = [cloning_error("teacher"), cloning_error("student")]
    assert after_warm[0] < 0.7 * before[0] and after_warm[1] < 0.8 * before[1], (before, after_warm)
    after = det.update(200)
    assert "t_expert" not in after and "s_bc" in after                       # SAC again: the paper's objective
    det.s.expert = 0.5
    assert "t_expert" in det.update(201)
    assert det.warm_start == 200                                              # a share of the stage's rounds
    for bad in (-0.1, 1.5):
        with pytest.raises(InputError, match="warm_start"):
            wsts.resolve_config({"detector": {"warm_start": bad}})


def test_agent_encoder_keeps_a_finer_map_and_records_it():
    """``strided`` / ``pool``: fewer stride-2 convolutions leave a finer map; the saved policy's arguments carry
    them, so the model store rebuilds the same network."""
    rac = R.RAC(width=4, features=8, strided=2, pool=8)
    kwargs = rac.policy_kwargs()
    assert kwargs["strided"] == 2 and kwargs["pool"] == 8
    state = torch.zeros(3, R.STATE_CHANNELS, 32, 32)
    assert rac.encoder.conv[:-2](state).shape[-1] == 8             # 32 px, two stride-2 convolutions
    rebuilt = R.PolicyNet(**kwargs)
    rebuilt.load_state_dict(rac.pi.state_dict())                    # same shapes
    assert rebuilt(state, torch.zeros(3, 4))[0].shape == (3, R.ACTION_DIM)


def test_replay_memory_ring_and_policy_rollout():
    rng = np.random.default_rng(1)
    mem = R.ReplayMemory(5)
    for n in range(3):
        mem.push([n, n], np.full((2, 4), n), np.zeros((2, 4)), [n, n], np.full((2, 4), n))
    assert len(mem) == 5 and int(mem.count) == 6
    assert sorted(mem.slice.tolist()) == [0, 1, 1, 2, 2]           # the oldest one was overwritten
    env = R.BoxEnv(size=16, init_box=4, translate=1, scale=1, episode_steps=4)
    pi = R.PolicyNet(width=4, features=8)
    images = torch.from_numpy(rng.random((3, 16, 16)).astype(np.float32))
    union, per_agent = R.detect([pi, pi], images, env)
    assert union.shape == (3, 4) and per_agent.shape == (2, 3, 4)
    assert np.all(R.iou(union, per_agent[0]) > 0)                   # the union holds each agent's box
    # 4 steps of at most 1 px from the start: the box cannot have travelled further
    assert np.all(np.abs(per_agent[0, :, 1] - env.starts(2)[0, 1]) <= 4 + 1e-5)


def test_exploring_starts_leave_the_fixed_start_boxes():
    """``random_starts`` = 1: no episode starts at the fixed upper / lower middle boxes; about half start within
    1.5 tumour sizes of the slice's tumour; 0 (the paper): every episode starts at the fixed boxes."""
    from WeakLiverSegLib.recipes import wsts

    images = {"enhanced": np.random.default_rng(0).random((2, 32, 32)).astype(np.float32)}
    targets = np.array([[8.0, 8.0, 4.0, 4.0], [24.0, 20.0, 6.0, 4.0]], np.float32)
    starts = {}
    for share in (0.0, 1.0):
        cfg = wsts.resolve_config({"detector": {**TINY["detector"], "size": 32, "random_starts": share}})
        det = wsts.make_detector(cfg, images, targets, np.random.default_rng(1), "cpu", "enhanced", None)
        starts[share] = det._reset(400)
    fixed = wsts.box_env(cfg).starts(2)
    assert np.allclose(starts[0.0]["boxes"], fixed[:, None])
    e = starts[1.0]
    boxes, tg = e["boxes"], targets[e["slice"]][None]
    assert not np.isclose(boxes, fixed[:, None]).all(axis=-1).any()
    assert np.all(R.corners(boxes)[..., :2] >= -1e-4) and np.all(R.corners(boxes)[..., 2:] <= 32 + 1e-4)
    near = np.all(np.abs(boxes[..., :2] - tg[..., :2]) <= 1.5 * tg[..., 2:] + 1e-4, axis=-1).mean()
    assert 0.45 < near < 0.75, near        # half by construction, plus the uniform starts that land near
    with pytest.raises(InputError, match="random_starts"):
        wsts.resolve_config({"detector": {"random_starts": 1.5}})


def test_state_has_a_wide_view_and_a_box_sized_glimpse():
    """Channels: (slice, box) over twice the image around the box, then over GLIMPSE box sizes: a bright pixel next
    to a small box fills a larger part of the glimpse; the box fills the glimpse's middle third."""
    img = torch.zeros(1, 32, 32)
    img[0, 10:12, 20:22] = 1.0                                   # a 2 x 2 bright spot at x 20-22, y 10-12
    box = torch.tensor([[21.0, 11.0, 4.0, 4.0]])                 # centred on it
    state, vec = R.render_states(img, torch.tensor([0]), box)
    assert state.shape == (1, R.STATE_CHANNELS, 32, 32) == (1, 4, 32, 32)
    wide, glimpse = state[0, 0], state[0, 2]
    assert float(glimpse.sum()) > 8 * float(wide.sum()) > 0      # the glimpse magnifies the spot 32 / 12 times more
    att = state[0, 3]
    third = 32 / R.GLIMPSE
    assert float(att[16, 16]) == 1.0 and float(att[1, 1]) == 0.0
    assert float(att[16].sum()) == pytest.approx(third, abs=1.5)
    assert torch.allclose(vec, box / 32)


# ----------------------------------------------------------------------------- USSE


class _AttentionEcho(nn.Module):
    """Tumour logit = 16 * (attention - 0.5): the prediction is exactly the box it is shown."""

    def forward(self, x):
        return 16.0 * (x[:, -1:] - 0.5)


def test_uncertainty_mask_filters_the_highest_entropy_pixels():
    images = torch.zeros(1, 1, 40, 40)
    box = np.array([[20.0, 20.0, 10.0, 10.0]], np.float32)
    mu, u = U.multiscale_uncertainty(_AttentionEcho(), images, box, std=0.0, clip=0.1)
    # inside every one of the nine boxes: certain tumour; outside all: certain background;
    # pixels covered by some boxes only (the ring between x1 and x1.4): uncertain.
    assert mu[0, 0, 20, 20] > 0.99 and mu[0, 0, 0, 0] < 0.01
    assert u[0, 0, 20, 20] < 0.05 and u[0, 0, 0, 0] < 0.05
    ring = u[0, 0, 20, 13]                      # x = 13.5: inside the x1.4 box, outside the x1 one
    assert ring > 0.3
    mask = U.uncertainty_mask(u, 0.5)
    assert mask[0, 0, 20, 20] and mask[0, 0, 0, 0] and not mask[0, 0, 20, 13]
    assert not U.uncertainty_mask(u, 0.0).any()                      # warm-up start: H = u_min
    full = U.uncertainty_mask(u, 1.0)                                # end: all but the maximum
    assert not full.flatten()[u.flatten().argmax()] and full.float().mean() > 0.5
    # the masked consistency ignores exactly the filtered pixels
    p, q = torch.zeros_like(u), torch.zeros_like(u)
    q[~mask] = 1.0
    assert float(U.masked_consistency(p, q, mask)) == 0.0 and float(U.masked_consistency(p, q, None)) > 0


def test_nine_boxes_and_ramp_up():
    boxes = U.nine_boxes(np.array([[10.0, 10.0, 4.0, 8.0]]))
    assert boxes.shape == (9, 1, 4)
    areas = boxes[:, 0, 2] * boxes[:, 0, 3]
    assert np.allclose(sorted(set(np.round(areas, 4))), [32, 32 * 1.44, 32 * 1.96])
    ratios = boxes[:3, 0, 2] / boxes[:3, 0, 3] / 0.5
    assert np.allclose(sorted(ratios), [0.5, 1.0, 2.0])
    assert U.ramp_up(0, 10) == 0.0 and U.ramp_up(10, 10) == 1.0 and 0 < U.ramp_up(5, 10) < U.ramp_up(8, 10) < 1


def test_tumour_outputs_start_at_the_prior():
    """USSE and the student start their tumour channel at ``network.tumour_prior`` (the liver channel is left
    alone); a prior outside (0, 1) is refused."""
    from WeakLiverSegLib.recipes import wsts

    cfg = wsts.resolve_config({"network": {"stem": 4, "growth": 4, "layers": 1, "levels": 2, "tumour_prior": 0.02}})
    torch.manual_seed(0)
    for role, channel in (("usse", 0), ("student", 1)):
        net = wsts.make_net(cfg, role).eval()
        assert float(net.head.bias[channel]) == pytest.approx(math.log(0.02 / 0.98), abs=1e-5)
        with torch.no_grad():
            p = torch.sigmoid(net(torch.rand(2, 2, 16, 16)))[:, channel]
        assert float(p.mean()) < 0.1
    assert abs(float(wsts.make_net(cfg, "student").head.bias[0])) < 1.0     # liver: default init
    with pytest.raises(InputError, match="network.tumour_prior"):
        wsts.resolve_config({"network": {"tumour_prior": 1.5}})


def test_ema_updates_the_target_model():
    from WeakLiverSegLib.recipes.wsts.dense_unet import DenseUNet2D

    torch.manual_seed(0)
    net = DenseUNet2D(2, 1, stem=4, growth=4, layers=1, levels=2)
    mt = U.MeanTeacher(net, torch.optim.Adam(net.parameters(), lr=1e-2), ema=0.99, uncertainty="multiscale")
    old_target = [p.detach().clone() for p in mt.target.parameters()]
    batch = {"image": torch.rand(2, 1, 16, 16), "box": np.array([[8.0, 8.0, 6.0, 6.0]] * 2, np.float32),
             "target": (torch.rand(2, 1, 16, 16) > 0.7).float(), "labelled": torch.tensor([True, False])}
    logs = mt.step(batch, 0, 10)
    assert logs["gamma"] == 0.0 and logs["beta_prime"] == 0.0 and logs["kept"] == 0.0   # ramps start at 0
    changed = 0
    for old, tgt, onl in zip(old_target, mt.target.parameters(), mt.online.parameters()):
        assert torch.allclose(tgt, 0.99 * old + 0.01 * onl.detach(), atol=1e-6)
        changed += int(not torch.equal(tgt, old))
    assert changed > 0
    assert not any(p.requires_grad for p in mt.target.parameters())


def _box_only_batch(rng, n=8, size=16):
    """Slices whose tumour disc is invisible (no contrast): the attention box is the only cue.

    Even slices hold a disc filling most of the box, odd slices the same box and no tumour."""
    img = torch.from_numpy(rng.normal(0.3, 0.05, (n, 1, size, size)).astype(np.float32))
    tumour = np.zeros((n, 1, size, size), np.float32)
    yy, xx = np.mgrid[:size, :size] + 0.5
    boxes = np.zeros((n, 4), np.float32)
    for i in range(n):
        cx, cy = rng.uniform(6, 10, 2)
        boxes[i] = [cx, cy, 6, 6]
        if i % 2 == 0:
            tumour[i, 0][(xx - cx) ** 2 + (yy - cy) ** 2 < 9.0] = 1
    return {"image": img, "box": boxes, "tumour": torch.from_numpy(tumour), "liver": torch.ones(n, 1, size, size),
            "pixel": torch.ones(n, dtype=torch.bool)}


def _tumour_called_on_empty_slices(bce: float) -> float:
    from WeakLiverSegLib.recipes.wsts.dense_unet import DenseUNet2D
    from WeakLiverSegLib.recipes import wsts

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = DenseUNet2D(2, 2, stem=4, growth=4, layers=1, levels=2, dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(40):
        b = _box_only_batch(rng)
        loss, _, _ = wsts.student_loss(net(U.with_attention(b["image"], b["box"])), b, 1.0, bce)
        opt.zero_grad()
        loss.backward()
        opt.step()
    b = _box_only_batch(rng)
    with torch.no_grad():
        p = torch.sigmoid(net.eval()(U.with_attention(b["image"], b["box"])))[:, 1]
    return float((p[1::2] > 0.75).float().mean())


def test_student_loss_does_not_learn_tumour_equals_box():
    """The study's failure (recall ~100 %, Dice ~5 %): with Dice alone the student calls the whole
    attention box tumour at 0.75, tumour-free slices included; the default loss (+ cross-entropy) does not."""
    from WeakLiverSegLib.recipes import wsts

    box_area = 36 / 256
    dice_only = _tumour_called_on_empty_slices(0.0)
    default = _tumour_called_on_empty_slices(wsts.DEFAULTS["student"]["bce"])
    assert dice_only > 0.7 * box_area            # the trap is real
    assert default < 0.6 * dice_only


# ----------------------------------------------------------------------------- recipe


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from WeakLiverSegLib.synth import phantom

    root = tmp_path_factory.mktemp("wsts") / "ds"
    return phantom.generate_cohort(root, cases=5, seed=3, shape=(24, 24, 6), spacing=(3.0, 3.0, 6.0), tumors=(1, 1),
                                   tumor_radius_mm=(8.0, 12.0), healthy_fraction=0.0,
                                   mix="strong=0.4,box=0.4,test=0.2")


@pytest.fixture(scope="module")
def model_dir(cohort, tmp_path_factory):
    from WeakLiverSegLib.recipes import wsts

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("wsts_model") / "m"
    try:
        return wsts.train(cohort, out, dict(TINY), "cpu", None)
    finally:
        torch.set_num_threads(before)


def test_model_reads_the_plain_phase_only(model_dir, cohort):
    from WeakLiverSegLib.learn.modelstore import load_model
    from WeakLiverSegLib.recipes import wsts

    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["recipe"] == "wsts" and meta["input"]["inference_phases"] == ["plain"]
    assert set(meta["networks"]) == {"student", "student_agent1", "student_agent2"}
    assert meta["training"]["data"]["pixel"] and meta["training"]["data"]["box"]
    model = load_model(model_dir)
    test = [c for c in cohort.cases.values() if c.split == "test"][0]
    plain = cohort.read_image(test.id, "plain")
    alone = wsts.segment(model, {"plain": plain})
    assert alone.labels.array.shape == plain.array.shape and alone.labels.array.dtype == np.uint8
    assert set(np.unique(alone.labels.array)) <= {0, 1, 2}
    # the enhanced phase changes nothing: it is never read
    garbage = plain.with_array(np.full(plain.array.shape, 3000, np.int16))
    both = wsts.segment(model, {"plain": plain, "enhanced": garbage})
    assert np.array_equal(both.labels.array, alone.labels.array)
    assert np.array_equal(both.probabilities.array, alone.probabilities.array)
    # the plain phase does matter
    other = wsts.segment(model, {"plain": cohort.read_image(test.id, "enhanced")})
    assert not np.array_equal(other.probabilities.array, alone.probabilities.array)
    with pytest.raises(InputError, match="plain"):
        wsts.segment(model, {"enhanced": plain, "arterial": plain})


def test_save_load_round_trip_and_cli_segment(model_dir, cohort, tmp_path):
    from WeakLiverSegLib.app import cli
    from WeakLiverSegLib.data.imageio import read_label_map, write_image
    from WeakLiverSegLib.learn.modelstore import load_model
    from WeakLiverSegLib.recipes import wsts

    a, b = load_model(model_dir), load_model(model_dir)
    for name in a.networks:
        sa, sb = a.networks[name].state_dict(), b.networks[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    test = [c for c in cohort.cases.values() if c.split == "test"][0]
    plain = cohort.read_image(test.id, "plain")
    expected = wsts.segment(a, {"plain": plain}).labels.array
    src = tmp_path / "plain.nii.gz"
    write_image(plain, src)
    out = tmp_path / "seg.nii.gz"
    code = cli.main(["segment", "--model", str(model_dir), "--input", str(src), "--out", str(out),
                     "--progress", "none"])
    assert code == 0
    assert np.array_equal(read_label_map(out).array, expected)


def test_usse_attention_label_boxes_replace_the_detection_on_labelled_slices():
    from WeakLiverSegLib.recipes import wsts

    case = wsts.WCase("c", "box", {"enhanced": np.zeros((4, 16, 16), np.float32)},
                      boxes={1: np.array([[5.0, 5.0, 4.0, 2.0], [9.0, 9.0, 6.0, 6.0]], np.float32)})
    case.det["teacher"] = np.tile(np.array([[3.0, 3.0, 2.0, 2.0]], np.float32), (4, 1))
    label = wsts.usse_boxes(case, "label")
    assert np.array_equal(label[1], [9.0, 9.0, 6.0, 6.0])                        # the dominant (largest) box
    assert np.array_equal(label[[0, 2, 3]], case.det["teacher"][[0, 2, 3]])    # detections where no label
    assert np.array_equal(wsts.usse_boxes(case, "detection"), case.det["teacher"])
    with pytest.raises(InputError, match="usse.attention"):
        wsts.resolve_config({"usse": {"attention": "boxes"}})


def test_student_pseudo_targets_soft_or_hard():
    """``student.pseudo``: the USSE probabilities as they are (soft) or thresholded at 0.5 (hard)."""
    from WeakLiverSegLib.recipes import wsts

    case = wsts.WCase("c", "box", {"plain": np.zeros((1, 8, 8), np.float32)})
    case.pseudo = np.full((1, 8, 8), 0.3, np.float32)
    case.pseudo[0, 2:5, 2:5] = 0.6
    case.det["student"] = np.array([[4.0, 4.0, 4.0, 4.0]], np.float32)
    targets = {}
    for mode in ("soft", "hard"):
        cfg = wsts.resolve_config({"student": {"batch": 1, "pseudo": mode}, "box_noise": {"shift": 0.0, "scale": [1.0, 1.0]}})
        batch = wsts.sample_student_batch([case], cfg, np.random.default_rng(0), "plain", "cpu")
        targets[mode] = batch["tumour"][0, 0].numpy()
    assert np.allclose(targets["soft"], case.pseudo[0])
    assert np.array_equal(targets["hard"], (case.pseudo[0] > 0.5).astype(np.float32))
    with pytest.raises(InputError, match="student.pseudo"):
        wsts.resolve_config({"student": {"pseudo": "binary"}})


def test_model_of_another_recipe_version_is_refused(model_dir, tmp_path):
    import shutil

    from WeakLiverSegLib.learn.modelstore import load_model
    from WeakLiverSegLib.recipes import wsts

    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    meta = json.loads((old / "model.json").read_text())
    meta["recipe_version"] = 1
    (old / "model.json").write_text(json.dumps(meta))
    plain = np.zeros((4, 16, 16), np.int16)
    from WeakLiverSegLib.data.volume import Volume

    with pytest.raises(InputError, match="recipe_version 1.*retrain"):
        wsts.segment(load_model(old), {"plain": Volume(plain, (3.0, 3.0, 6.0))})


def test_config_and_data_errors(cohort, tmp_path):
    from WeakLiverSegLib.recipes import wsts
    from WeakLiverSegLib.data.store import Dataset

    with pytest.raises(InputError, match="detector.agnts"):
        wsts.resolve_config({"detector": {"agnts": 2}})
    with pytest.raises(InputError, match="detector.agents"):
        wsts.resolve_config({"detector": {"agents": 3}})
    cfg = wsts.resolve_config({"steps": 30})
    assert sum(cfg[k]["steps"] for k in wsts.STAGES) == pytest.approx(30, abs=2)
    one = Dataset.create(tmp_path / "one")
    case = next(c for c in cohort.cases.values() if c.mask is not None)
    one.add_case("c0", {"enhanced": cohort.read_image(case.id, "enhanced")}, mask=cohort.read_mask(case.id))
    one.save()
    with pytest.raises(InputError, match=r"c0: .*phases.*plain"):
        wsts.train(Dataset.load(tmp_path / "one"), tmp_path / "m", dict(TINY))


def test_cancel_then_resume_finishes_the_model(cohort, tmp_path):
    from WeakLiverSegLib.errors import Cancelled
    from WeakLiverSegLib.app.progress import Progress
    from WeakLiverSegLib.recipes import wsts

    class StopInUsse(Progress):
        def update(self, stage, step, total, **fields):
            super().update(stage, step, total, **fields)
            if stage == "usse" and step >= 2:
                self.cancelled = True

    cfg = dict(TINY, checkpoint_every=1)
    out = tmp_path / "m"
    with pytest.raises(Cancelled):
        wsts.train(cohort, out, cfg, "cpu", StopInUsse("none"))
    saved = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert saved["stage"] == "usse" and saved["step"] >= 1 and not (out / "model.json").exists()
    with pytest.raises(InputError, match="--resume"):
        wsts.train(cohort, out, cfg, "cpu", None)                    # refuses to start over silently
    with pytest.raises(InputError, match="different settings"):
        wsts.train(cohort, out, dict(cfg, seed=1), "cpu", None, resume=True)
    progress = Progress("none")
    wsts.train(cohort, out, cfg, "cpu", progress, resume=True)
    stages = {e["stage"] for e in progress.history}
    assert "detector" not in stages and {"usse", "student"} <= stages      # the detector stage was not redone
    assert (out / "model.json").exists() and not (out / "checkpoint").exists()
