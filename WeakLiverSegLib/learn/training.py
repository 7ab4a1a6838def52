"""Training helpers shared by every recipe: device choice, optimizers and schedules, losses,
checkpoints that survive an interruption, the segmentation result type.

Checkpoints are a folder (``<model>/checkpoint/``) holding ``checkpoint.json`` (stage, step,
optimizer hyper-parameters and scalar state, numpy RNG state, recipe extras) and one
``state-<stage>-<step>.safetensors`` with every tensor (network weights and buffers, optimizer
tensors, torch RNG state).  Never pickle.  The JSON is replaced atomically *after* its
safetensors file is complete and names it, so a crash at any moment leaves the previous
consistent checkpoint in place.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..data.safeio import make_parent
from .modelstore import state_dict_problem, write_json_atomic, write_safetensors

CHECKPOINT_FORMAT = "weakliverseg-checkpoint"
CHECKPOINT_VERSION = 1
OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
class SegmentResult:
    """What ``recipe.segment`` returns, on the input grid: ``labels`` uint8 0/1/2, ``probabilities``
    float32 tumour probability and ``uncertainty`` float32 predictive entropy (None when a recipe
    has none)."""
    labels: object
    probabilities: object = None
    uncertainty: object = None


class LazySegmentResult(SegmentResult):
    """A ``SegmentResult`` whose probability and uncertainty maps are made on first use by
    ``make_maps() -> (probabilities, uncertainty)``: a ``segment`` that writes only the labels never
    resamples those float maps to the (512x512) input grid."""

    def __init__(self, labels, make_maps):
        self.labels = labels
        self._make_maps = make_maps
        self._maps = None

    def _get(self, n: int):
        if self._maps is None:
            self._maps = tuple(self._make_maps())
        return self._maps[n]

    probabilities = property(lambda self: self._get(0))
    uncertainty = property(lambda self: self._get(1))


# ----------------------------------------------------------------------------- inference precision

PRECISIONS = ("auto", "float32", "bfloat16")
PRECISION_ENV = "WEAKLIVERSEG_PRECISION"    # set by ``segment --precision``; batch workers inherit it


def _cpu_has_amx() -> bool:
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:       # a private torch helper: without it, the safe float32
        return False


def inference_dtype(device, precision: str | None = None) -> torch.dtype:
    """Float type a network runs in at inference: ``float32``, ``bfloat16``, or ``auto`` (default:
    ``precision`` else $WEAKLIVERSEG_PRECISION) = bfloat16 on a CPU with AMX tiles, else float32.

    There oneDNN runs the U-Net's convolutions about 3x faster in bfloat16; labels differ from
    float32 only at a few boundary voxels (measured in docs/results/segment_speed.json).
    """
    precision = (precision or os.environ.get(PRECISION_ENV) or "auto").strip().lower()
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bfloat16" if str(device).startswith("cpu") and _cpu_has_amx() else "float32"
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


# ----------------------------------------------------------------------------- device


def select_device(name: str = "auto") -> str:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` -> a torch device string."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InputError(f"--device {name}: CUDA was asked for but is not available ({why}); use --device cpu or auto")
        if ":" in name:
            index = name.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise InputError(f"--device {name}: no such GPU ({torch.cuda.device_count()} visible)")
        return name
    raise InputError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


def check_cancelled(progress) -> None:
    """Raise ``errors.Cancelled`` when the user asked to stop (``progress`` may be None)."""
    if progress is not None:
        progress.check_cancelled()


def write_pseudo_store(dataset, out_dir, weak_ids, relabel, suffix: str = "pseudo", progress=None) -> Path:
    """Copy ``dataset`` to the new store ``out_dir``; the cases in ``weak_ids`` get as mask what
    ``relabel(case, images)`` returns (``images``: phase -> Volume; None keeps the case's own).

    The target must be a new folder (never the source store); ``out_dir/pseudo/`` is there for the
    recipe's probability maps.  Returns ``out_dir``.
    """
    from ..data.store import Dataset

    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(dataset.root).resolve():
        raise InputError(f"{out_dir}: pseudo-labels go to a new folder, not into the source dataset")
    target = Dataset.create(out_dir, name=f"{dataset.name or 'dataset'}-{suffix}", exist_ok=False)
    (out_dir / "pseudo").mkdir(exist_ok=True)
    total = len(dataset.cases)
    for n, case in enumerate(dataset.cases.values()):
        check_cancelled(progress)
        images = {phase: dataset.read_image(case.id, phase) for phase in case.images}
        mask = relabel(case, images) if case.id in weak_ids else None
        truth = {key: dataset.read_truth(case.id, key) for key in (case.truth or {})} or None
        target.add_case(case.id, images, reference=case.reference,
                        mask=dataset.read_mask(case.id) if mask is None else mask, boxes=case.boxes,
                        liver_box=case.liver_box, couinaud=case.couinaud, volume_label=case.volume_label,
                        split=case.split, truth=truth)
        if progress is not None:
            progress.update("pseudo", n + 1, total)
    return out_dir


# ----------------------------------------------------------------------------- optimisation


def make_optimizer(params, cfg: dict, where: str = "optimizer") -> torch.optim.Optimizer:
    """``cfg``: ``optimizer`` (adam | adamw | sgd), ``lr``, ``momentum`` (sgd), ``weight_decay``."""
    kind = str(cfg.get("optimizer", "adam")).lower()
    lr = float(cfg["lr"])
    wd = float(cfg.get("weight_decay", 0.0))
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(cfg.get("momentum", 0.9)), weight_decay=wd)
    raise InputError(f"{where}: unknown optimizer {kind!r} (choose from {', '.join(OPTIMIZERS)})")


def lr_at(step: int, total: int, cfg: dict) -> float:
    """Learning rate for optimisation step ``step`` (0-based) of ``total``.

    Constant ``lr``, then from ``lr_decay_start`` (a fraction of ``total``; 1 = never) multiplied
    by ``lr_decay`` every step, the paper's "decrease by 0.95" tail.
    """
    lr = float(cfg["lr"])
    start = int(math.floor(float(cfg.get("lr_decay_start", 1.0)) * total))
    if step >= start:
        lr *= float(cfg.get("lr_decay", 1.0)) ** (step - start + 1)
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy with class-probability targets (B, C, ...) (one-hot targets = the usual CE).

    ``weight`` (C,) weights the classes like ``F.cross_entropy(weight=...)``: the mean is taken
    over the per-pixel weights ``sum_c target_c * weight_c``.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    target = target.float()
    if weight is None:
        return -(target * logp).sum(dim=1).mean()
    w = weight.to(logp).view(1, -1, *([1] * (logp.dim() - 2)))
    per_pixel = -(target * w * logp).sum(dim=1)
    norm = (target * w).sum(dim=1).sum().clamp_min(1e-12)
    return per_pixel.sum() / norm


def scale_steps(stage_steps: dict, total) -> dict:
    """Scale per-stage step counts to about ``total`` steps overall (every stage at least 1)."""
    if total is None:
        return dict(stage_steps)
    total = int(total)
    if total < 1:
        raise InputError(f"steps must be positive, got {total}")
    base = sum(stage_steps.values())
    return {k: max(1, int(round(total * v / base))) if base else 1 for k, v in stage_steps.items()}


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    stage: str
    step: int
    meta: dict
    tensors: dict


class Checkpointer:
    """Save / restore networks + optimizers + step + RNG state, safetensors + JSON (no pickle)."""

    def __init__(self, folder, every: int = 50, identity: dict | None = None):
        self.folder = Path(folder)
        self.every = max(1, int(every))
        self.identity = dict(identity or {})   # recipe and dataset of the run, checked by open_run on --resume

    @property
    def json_path(self) -> Path:
        return self.folder / "checkpoint.json"

    def exists(self) -> bool:
        return self.json_path.is_file()

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, stage: str, step: int, networks: dict, optimizers: dict | None = None,
             rng: np.random.Generator | None = None, extra: dict | None = None) -> Path:
        from .distributed import barrier, is_main

        fname = f"state-{stage}-{step:07d}.safetensors"
        if not is_main():   # torchrun: rank 0 alone writes (networks and RNG state are the same on every rank)
            barrier()       # ... and no rank goes on (or stops) before the checkpoint is complete
            return self.folder / fname
        path = self._write(stage, step, fname, networks, optimizers, rng, extra)
        barrier()
        return path

    def _write(self, stage, step, fname, networks, optimizers, rng, extra) -> Path:
        created = not self.folder.exists()
        make_parent(self.json_path, "checkpoint")
        tensors, opt_meta = {}, {}
        for name, net in networks.items():
            for key, value in net.state_dict().items():
                tensors[f"net/{name}/{key}"] = value.detach().cpu().contiguous()
        for name, opt in (optimizers or {}).items():
            opt_meta[name] = _flatten_optimizer(opt.state_dict(), f"opt/{name}", tensors)
        tensors["rng/torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for n, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda/{n}"] = state
        try:
            write_safetensors(self.folder / fname, tensors, {"format": CHECKPOINT_FORMAT})
        except InputError as exc:
            if created:  # a full disk at the first checkpoint: no empty folder left behind
                try:
                    self.folder.rmdir()
                except OSError:
                    pass
            raise InputError(f"{exc}; training stopped, the last good checkpoint (if any) is kept") from None
        meta = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "stage": stage, "step": int(step),
            "file": fname, "networks": sorted(networks), "optimizers": opt_meta,
            "numpy_rng": _rng_state_to_json(rng.bit_generator.state) if rng is not None else None,
            "extra": extra or {},
        }
        meta.update(self.identity)
        try:
            write_json_atomic(self.json_path, meta)
        except InputError:
            if self._named_file() != fname:   # the old checkpoint.json still names the old state
                (self.folder / fname).unlink(missing_ok=True)
            raise
        for old in self.folder.glob("state-*.safetensors"):   # only the newest is referenced
            if old.name != fname:
                old.unlink(missing_ok=True)
        return self.folder / fname

    def _named_file(self):
        try:
            return json.loads(self.json_path.read_text(encoding="utf-8")).get("file")
        except (OSError, ValueError, AttributeError):
            return None

    def load(self) -> Checkpoint | None:
        """The last checkpoint, or None when there is none; InputError when it is corrupt."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not self.exists():
            return None
        where = self.json_path
        hint = "delete the checkpoint folder to start over"
        try:
            meta = json.loads(where.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{where}: unreadable checkpoint ({exc}); {hint}") from None
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"{where}: not a WeakLiverSeg checkpoint; {hint}")
        if meta.get("version") != CHECKPOINT_VERSION:
            raise InputError(f"{where}: checkpoint version {meta.get('version')!r} is not supported; {hint}")
        fname = meta.get("file")
        if not isinstance(fname, str) or Path(fname).name != fname or not fname.endswith(".safetensors"):
            raise InputError(f"{where}: bad 'file' field {fname!r}; {hint}")
        path = self.folder / fname
        try:
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise InputError(f"{path}: not a valid safetensors checkpoint ({exc}); {hint}") from None
        return Checkpoint(str(meta["stage"]), int(meta["step"]), meta, tensors)

    def restore(self, ckpt: Checkpoint, networks: dict, optimizers: dict | None = None,
                rng: np.random.Generator | None = None) -> None:
        """Load the checkpoint's state into ``networks`` / ``optimizers`` / ``rng`` and the torch RNG."""
        where = self.folder / ckpt.meta["file"]
        try:
            for name, net in networks.items():
                prefix = f"net/{name}/"
                state = {k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}
                net.load_state_dict(state, strict=True)
            for name, opt in (optimizers or {}).items():
                opt.load_state_dict(_unflatten_optimizer(ckpt.meta["optimizers"][name], f"opt/{name}", ckpt.tensors))
        except (KeyError, RuntimeError, ValueError) as exc:
            raise InputError(f"{where}: checkpoint does not fit this training run "
                             f"({state_dict_problem(exc)}); delete the checkpoint folder to start over") from None
        torch.set_rng_state(ckpt.tensors["rng/torch"])
        cuda = sorted(k for k in ckpt.tensors if k.startswith("rng/cuda/"))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([ckpt.tensors[k] for k in cuda])
        if rng is not None and ckpt.meta.get("numpy_rng") is not None:
            rng.bit_generator.state = _rng_state_from_json(ckpt.meta["numpy_rng"])

    def resume(self, ckpt: Checkpoint, networks: dict, optimizers: dict, rng, state: dict, progress=None) -> tuple:
        """``restore`` plus the run's curves / seconds into ``state``; returns ``(stage, step)`` to continue at."""
        self.restore(ckpt, networks, optimizers, rng)
        state["curves"] = ckpt.meta["extra"].get("curves", {})
        state["seconds"] = ckpt.meta["extra"].get("seconds", {})
        if progress is not None:
            progress.log(f"resuming from {ckpt.stage} step {ckpt.step}")
        return ckpt.stage, ckpt.step

    def clear(self) -> None:
        """Remove the checkpoint (after the final model is saved)."""
        from .distributed import is_main

        if not is_main() or not self.folder.is_dir():
            return
        for path in list(self.folder.iterdir()):
            if path.name == "checkpoint.json" or path.name.startswith(("state-", ".state-", ".checkpoint.json")):
                path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass


def _flatten_optimizer(state_dict: dict, prefix: str, tensors: dict) -> dict:
    """Optimizer state dict -> JSON-able dict; its tensors go into ``tensors`` under ``prefix``."""
    scalars = {}
    for pid, pstate in state_dict["state"].items():
        entry = {}
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}/{pid}/{key}"] = value.detach().cpu().contiguous()
                entry[key] = {"tensor": True}
            else:
                entry[key] = {"value": value}
        scalars[str(pid)] = entry
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return {"param_groups": groups, "state": scalars}


def _unflatten_optimizer(meta: dict, prefix: str, tensors: dict) -> dict:
    state = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {key: (tensors[f"{prefix}/{pid}/{key}"] if spec.get("tensor") else spec["value"])
                           for key, spec in entry.items()}
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _rng_state_to_json(state: dict) -> dict:
    """numpy bit-generator state (nested dict of ints, maybe arrays) -> JSON (big ints as strings)."""
    def conv(v):
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, np.ndarray):
            return {"ndarray": v.tolist(), "dtype": str(v.dtype)}
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return {"int": str(int(v))}
        return v
    return conv(state)


def _rng_state_from_json(state):
    if isinstance(state, dict):
        if set(state) == {"int"}:
            return int(state["int"])
        if set(state) == {"ndarray", "dtype"}:
            return np.asarray(state["ndarray"], dtype=state["dtype"])
        return {k: _rng_state_from_json(v) for k, v in state.items()}
    return state


def optimizer_step(opt, loss, stage: str, step: int) -> float:
    """One gradient step on ``loss``; returns its value, RuntimeError naming the stage if not finite."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    from .distributed import mean

    value = mean(float(loss.detach()))   # torchrun: the loss of the global batch
    if not math.isfinite(value):
        raise RuntimeError(f"{stage}: loss became {value} at step {step + 1}")
    return value


def most_common_phase(cases, default: str) -> str:
    """The reference phase most cases share (ties: alphabetical, so runs are reproducible)."""
    phases = [c.reference for c in cases]
    return max(sorted(set(phases)), key=phases.count) if phases else default


def first_difference(a, b, path: str = "") -> str | None:
    """Dotted path of the first setting where two nested config dicts differ; None when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            d = first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if d:
                return d
        return None
    return None if a == b else (path or "config")


def dataset_identity(dataset) -> dict:
    """The store a run trains on: its folder and the SHA-256 of its ``dataset.json`` (any added case,
    changed label or split changes it)."""
    import hashlib

    root = Path(dataset.root)
    try:
        digest = hashlib.sha256((root / "dataset.json").read_bytes()).hexdigest()
    except OSError:
        digest = None
    return {"path": str(root.resolve()), "sha256": digest}


def _barrier() -> None:
    """torchrun: every rank has checked ``--out`` before rank 0 writes its first checkpoint there."""
    from .distributed import barrier

    barrier()


def open_run(out: Path, cfg: dict, resume: bool, init=None, dataset=None, recipe: str | None = None):
    """Start or resume the training run in the model folder ``out`` -> ``(checkpointer, saved, init)``.

    ``saved`` is the checkpoint to continue from (``--resume``) or None; ``init`` is the run's
    ``--init`` model, taken from the checkpoint when resuming. Every checkpoint records ``recipe``
    and the identity of ``dataset`` (folder + hash of dataset.json).  Refuses, with one InputError and
    nothing changed: a resume without a checkpoint, with another recipe, another dataset (or one
    changed since), or other settings than the interrupted run, and a fresh run over an interrupted
    run or a finished model.
    """
    out = Path(out)
    identity = {}
    if recipe is not None:
        identity["recipe"] = recipe
    if dataset is not None:
        identity["dataset"] = dataset_identity(dataset)
    ckpt = Checkpointer(out / "checkpoint", cfg["checkpoint_every"], identity)
    if not resume:
        if ckpt.exists():
            raise InputError(f"{out}: holds an interrupted training run; pass --resume to continue it, "
                             f"or choose another --out")
        if (out / "model.json").exists():
            raise InputError(f"{out}: already holds a model; choose another --out (nothing was changed)")
        _barrier()
        return ckpt, None, init
    saved = ckpt.load()
    if saved is None:
        raise InputError(f"{out}: no checkpoint to resume from (train without --resume to start)")
    where = ckpt.json_path
    was = saved.meta.get("recipe")
    if recipe is not None and was is not None and was != recipe:
        raise InputError(f"{where}: the interrupted run trained recipe {was!r}, not {recipe!r}; "
                         f"resume with --recipe {was}")
    was = saved.meta.get("dataset")
    if dataset is not None and isinstance(was, dict):
        now = identity["dataset"]
        if was.get("path") != now["path"]:
            raise InputError(f"{where}: the interrupted run trained on the dataset {was.get('path')}, not "
                             f"{now['path']}; resume with --dataset {was.get('path')} (one model, one cohort)")
        if was.get("sha256") != now["sha256"]:
            raise InputError(f"{Path(now['path']) / 'dataset.json'}: changed since the interrupted run started "
                             f"(cases, labels or splits differ); a resumed run must see the same data: "
                             f"train again into a new --out")
    old_cfg = saved.meta["extra"].get("config")
    diff = first_difference(old_cfg, cfg)
    if diff is not None:
        if isinstance(old_cfg, dict) and set(old_cfg) != set(cfg):
            raise InputError(f"{out}: --resume with the settings of another recipe than the interrupted run "
                             f"(its settings have other keys, e.g. {diff!r}); use the same --recipe")
        raise InputError(f"{out}: --resume with different settings than the interrupted run ({diff!r} differs); "
                         f"use the same command line")
    _barrier()
    return ckpt, saved, saved.meta["extra"].get("init")


def recalibrate_batchnorm(net, sampler, batches: int, device="cpu", progress=None, stage="bn-recalibration") -> None:
    """Re-estimate every BatchNorm's running mean / variance as the plain average over ``batches``
    training batches (train-mode forward passes, no gradient), then leave ``net`` in eval mode.

    After training on very heterogeneous images (the domain-randomised phantoms: every case its
    own contrast) the exponential running statistics can be far from what the final weights see:
    the starter model's student, in eval mode, found almost no liver on its own training cases
    while the same weights with batch statistics found it (Dice 0.003 vs 0.89); re-estimated
    statistics gave 0.89 (8 slices of one training case, at step 350).
    """
    import torch

    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or batches <= 0:
        return
    dev = torch.device(device if device is not None else "cpu")
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None          # cumulative average
    net.train()
    with torch.no_grad():
        for n in range(int(batches)):
            check_cancelled(progress)
            batch = sampler.sample()
            x = batch["image"].to(dev).contiguous(memory_format=torch.channels_last)
            net(x, batch["boxes"].to(dev)) if getattr(net, "needs_boxes", False) else net(x)
            if progress is not None:
                progress.update(stage, n + 1, int(batches))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    net.eval()
