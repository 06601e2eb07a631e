"""How spatial is the CSKD teacher's dense map? For a default CNN teacher checkpoint, on the val split:
per location, how often argmax of the dense logits equals the global argmax and the label, and the
teacher's per-location top-1. Usage: python docs/cskd_dense.py TEACHER.safetensors IMG_SIZE"""

import sys

import torch

from fastkd.data import load_data
from fastkd.data.augment import eval_batch
from fastkd.models import forward_taps, resolve_model

path, img = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
d = load_data("digits", img_size=img)
m = resolve_model(path, num_classes=d.num_classes, img_size=d.img_size, in_chans=d.in_chans).eval()
with torch.no_grad():
    t = forward_taps(m, eval_batch(d.x_val, d.mean, d.std), dense=True)
dense, glob, y = t.dense_logits, t.logits, d.y_val
loc = dense.argmax(1)  # [B, h, w]
g = glob.argmax(1)[:, None, None]
print(f"map {tuple(dense.shape[-2:])}; global top-1 {100 * (glob.argmax(1) == y).float().mean():.2f}%")
print(f"locations agreeing with the global argmax: {100 * (loc == g).float().mean():.2f}%")
print(f"locations whose argmax is the label: {100 * (loc == y[:, None, None]).float().mean():.2f}%")
print("per-location top-1 (%):")
print((100 * (loc == y[:, None, None]).float().mean(0)).round(decimals=1))
