"""Seconds per outer iteration of the AUTHORS' PyTorch algorithm on this machine, for the
MNIST configs of `benchmarks.outer_step`.

    python benchmarks/torch_reference.py [--experiment=mnist_fixed_init_paper] --iterations=60
        [--warmup=3] [--threads=2] [--check] [--device=cuda]

--experiment picks the setting (`EXPERIMENTS`): mnist_fixed_init_paper (S=1, one fixed net),
mnist_fixed_init_100 (S=10, one fixed net) or mnist_random_init (S=10, 4 nets re-initialised
every iteration, as the authors' ``--train_nets_type unknown_init --sample_n_nets 4``).

A stand-alone re-creation (plain PyTorch + numpy, no dd_jax import) of one outer iteration of
SsnL/dataset-distillation as run by its README's "fixed known initialization" MNIST command
(`--distill_steps 1 --train_nets_type known_init --n_nets 1`, everything else default), so that
`benchmarks.outer_step` can be compared with it on the same machine at the same
time. Prints one JSON line: median / q1 / q3 wall seconds per outer iteration after warm-up,
the torch version and the intra-op thread count. Needs torch (CPU use) in its own virtual
environment; it is not a dependency of dd_jax.

What was CONFIRMED by reading the authors' source (train_distilled_image.py, networks/networks.py,
networks/utils.py, networks/__init__.py, basics.py, base_options.py, README.md):
- LeNet: conv(nc,6,5, padding=2 for 28 px) -> relu(inplace) -> max_pool2d(2) -> conv(6,16,5) -> relu
  -> max_pool2d(2) -> view -> fc 400-120 -> relu -> fc 120-84 -> relu -> fc 84-10; no dropout.
- Reparametrisation: every weight and bias is concatenated into ONE flat parameter vector `flat_w`;
  the modules' own parameters are deleted and re-registered as buffers, and `forward_with_param`
  sets split/viewed slices of a given flat vector as those attributes for the duration of one
  ordinary nn.Module call (the `ReparamModule` below does the same, written anew).
- Init: defaults `--init xavier --init_param 1.0`: xavier_normal_(gain=1) on Conv*/Linear weights,
  biases 0; known_init with n_nets=1 builds the net once and never resets it during distillation.
- Distilled data: S = distill_steps = 1 batch of num_classes x 1 = 10 images, randn(10,1,28,28),
  requires_grad; hard labels arange(10); T = S x distill_epochs(3) = 3 steps, the batch cycled.
- Step sizes: one raw value per step, shape (T, 1), raw = log(expm1(distill_lr=0.02)); the step
  size used is softplus(raw), recomputed each iteration (`get_steps`).
- Outer optimiser: Adam(lr=0.01, betas=(0.5, 0.999)) over [data..., raw_lrs]; StepLR(step_size=
  decay_epochs=40, gamma=0.5) stepped once per pass; grads pre-allocated as zeros.
- Real batch: batch_size 1024 (train_loader, shuffle=True); meta-loss F.cross_entropy of the net
  after the T steps (`final_objective_loss`, mode distill_basic), the inner loss also F.cross_entropy.
- Forward (per net): w = flat_w; for each step: loss = CE(net(data; w), label);
  gw = autograd.grad(loss, w, grad_outputs=lr, create_graph=True) (lr folded in as the grad_output);
  new_w = w.sub(gw) computed under no_grad and made a fresh leaf (requires_grad_). Then the real-batch
  loss at the last w.
- Backward (manual, reverse over steps): dw = autograd.grad(L, w_T); for each step t from last to
  first: autograd.grad(outputs=gw_t, inputs=[w_t, data_t, lr_t], grad_outputs=-dw); data grads are
  added into data.grad, dw += grad wrt w_t (in place), and the lr grads are pushed through softplus
  to raw_lrs.grad by one torch.autograd.backward(lrs, glrs) (`accumulate_grad`).
- Then grads divided by sample_n_nets (1), optimizer.step(). Their logged "Train Time" spans
  get_steps .. optimizer.step (data loading excluded), as timed here.
- Seeding: base_seed 1 via torch's default generator (used here too; timing does not depend on it).
- The later revision of train_distilled_image.py passes `lr.squeeze()` as the grad_output (the
  earlier one passed `lr`, which current PyTorch rejects for a scalar loss); this file follows the
  later one.

Deliberate differences / NOT confirmed:
- Real data: random N(0,1) images with random labels instead of normalised MNIST (values do not
  change the work done); every batch is 1024 (their loader's last batch of a pass has 608 images,
  1 iteration in 59); no DataLoader workers / pinned memory, so data loading costs nothing here.
- zero_grad(set_to_none=False): their `optimizer.zero_grad()` relied on old PyTorch zeroing grads
  in place; on PyTorch >= 2.0 the default sets them to None and their `d.grad.add_` fails (a known
  breakage). Zeroing in place is what they ran with.
- Their periodic evaluation / checkpoint (each 10 passes) and logging (every 100 iterations) are not
  run: they are not part of the per-iteration cost.
- The torch build and its CPU kernels (oneDNN/MKL) differ from what they ran in 2018-2020; the
  distributed (NCCL) path is not reproduced. Which PyTorch version the quoted 0.087-0.098 s came from
  (the project notes say 2.13) was not re-checked here.
- Threads: default = core count (2), as asked. Observed while writing this (load average ~5 on the
  2 shared cores): 2 intra-op threads were several times slower and far noisier than 1, since
  torch's OpenMP threads wait on each other when a core is taken away; compare like with like
  (`--threads`) and read the loadavg fields printed alongside.
- `--check` compares the manual meta-gradient against plain autograd through the whole unroll
  (create_graph) once, as a correctness check of this re-creation (not of theirs).
- `--device=cuda` builds everything on the GPU (`torch.set_default_device`) and waits for the
  GPU before each iteration's clock is read, for a comparison on the same GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CLASSES = 10
NC, INPUT_SIZE = 1, 28


class ReparamModule(nn.Module):
    """A module whose weights all live in one flat leaf vector `flat_w` (the authors' scheme)."""

    def flatten_weights(self):
        named = [(m, n) for m in self.modules() for n, p in m.named_parameters(recurse=False)
                 if p is not None]
        ws = [m._parameters[n].detach() for m, n in named]
        self._w_slots = tuple(named)
        self._w_numels = tuple(w.numel() for w in ws)
        self._w_shapes = tuple(w.shape for w in ws)
        flat = torch.cat([w.reshape(-1) for w in ws])
        for m, n in named:  # the per-module parameters become (empty) buffers
            delattr(m, n)
            m.register_buffer(n, None)
        self.register_parameter("flat_w", nn.Parameter(flat, requires_grad=True))
        return self

    def forward_with_param(self, x, flat_w):
        pieces = (t.view(s) for t, s in zip(flat_w.split(self._w_numels), self._w_shapes))
        for (m, n), w in zip(self._w_slots, pieces):
            setattr(m, n, w)
        try:
            return nn.Module.__call__(self, x)
        finally:
            for m, n in self._w_slots:
                setattr(m, n, None)

    def reset_xavier(self, gain=1.0):
        """xavier_normal_(gain) on Conv/Linear weights, zero biases, written into flat_w."""
        with torch.no_grad():
            pieces = [t.view(s) for t, s in zip(self.flat_w.split(self._w_numels), self._w_shapes)]
            for (_, n), w in zip(self._w_slots, pieces):
                if n == "bias":
                    nn.init.constant_(w, 0.0)
                else:
                    nn.init.xavier_normal_(w, gain=gain)
        return self


class LeNet(ReparamModule):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(NC, 6, 5, padding=2 if INPUT_SIZE == 28 else 0)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, NUM_CLASSES)

    def forward(self, x):
        out = F.max_pool2d(F.relu(self.conv1(x), inplace=True), 2)
        out = F.max_pool2d(F.relu(self.conv2(out), inplace=True), 2)
        out = out.view(out.size(0), -1)
        out = F.relu(self.fc1(out), inplace=True)
        out = F.relu(self.fc2(out), inplace=True)
        return self.fc3(out)


EXPERIMENTS = {  # name -> (distill_steps S, nets per iteration, re-initialised every iteration)
    "mnist_fixed_init_paper": (1, 1, False),
    "mnist_fixed_init_100": (10, 1, False),
    "mnist_random_init": (10, 4, True),
}


class AuthorsStyleDistiller:
    """The per-iteration algorithm of their Trainer (see module docstring): `n_nets` nets, each
    re-initialised (Xavier normal) every iteration when `random_init`, else one fixed net."""

    def __init__(self, model, steps=1, epochs=3, ipc=1, distill_lr=0.02, lr=0.01,
                 decay_epochs=40, decay_factor=0.5, n_nets=1, random_init=False):
        self.model = model
        self.n_nets = n_nets
        self.random_init = random_init
        self.epochs = epochs
        self.T = steps * epochs
        label = torch.arange(NUM_CLASSES).repeat(ipc, 1).t().reshape(-1)
        self.labels = [label for _ in range(steps)]
        self.data = [torch.randn(NUM_CLASSES * ipc, NC, INPUT_SIZE, INPUT_SIZE, requires_grad=True)
                     for _ in range(steps)]
        self.raw_lrs = torch.tensor(distill_lr).repeat(self.T, 1).expm1_().log_().requires_grad_()
        self.params = self.data + [self.raw_lrs]
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(0.5, 0.999))
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=decay_epochs,
                                                         gamma=decay_factor)
        for p in self.params:
            p.grad = torch.zeros_like(p)

    def get_steps(self):
        pairs = [x for _ in range(self.epochs) for x in zip(self.data, self.labels)]
        lrs = F.softplus(self.raw_lrs).unbind()
        return [(d, l, lr) for (d, l), lr in zip(pairs, lrs)]

    def forward(self, rdata, rlabel, steps):
        model = self.model
        model.train()
        w = model.flat_w
        ws, gws = [w], []
        for data, label, lr in steps:
            with torch.enable_grad():
                loss = F.cross_entropy(model.forward_with_param(data, w), label)
            gw, = torch.autograd.grad(loss, w, lr.squeeze(), create_graph=True)
            with torch.no_grad():
                w = w.sub(gw).requires_grad_()
            ws.append(w)
            gws.append(gw)
        model.eval()
        final = F.cross_entropy(model.forward_with_param(rdata, ws[-1]), rlabel)
        return final, ws, gws

    def backward(self, final, ws, gws, steps):
        dw, = torch.autograd.grad(final, (ws[-1],))
        self.model.train()
        out = []
        for (data, _, lr), w, gw in reversed(list(zip(steps, ws, gws))):
            g_w, g_data, g_lr = torch.autograd.grad(outputs=(gw,), inputs=[w, data, lr],
                                                    grad_outputs=(dw.neg(),))
            with torch.no_grad():
                out.append((data, g_data, lr, g_lr))
                dw.add_(g_w)
        return out

    def accumulate_grad(self, grad_infos):
        """Every net's gradients at once (the step sizes' softplus graph is walked once)."""
        grad_info = [x for info in grad_infos for x in info]
        for data, g_data, _, _ in grad_info:
            data.grad.add_(g_data)
        torch.autograd.backward([x[2] for x in grad_info], [x[3] for x in grad_info])

    def outer_iteration(self, rdata, rlabel, new_pass=False):
        if new_pass:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=False)
        steps = self.get_steps()
        losses, infos = [], []
        for _ in range(self.n_nets):
            if self.random_init:
                self.model.reset_xavier(1.0)
            final, ws, gws = self.forward(rdata, rlabel, steps)
            losses.append(final.detach())
            infos.append(self.backward(final, ws, gws, steps))
            del final, ws, gws
        self.accumulate_grad(infos)
        for p in self.params:  # / sample_n_nets, as they do
            p.grad.div_(self.n_nets)
        self.optimizer.step()
        return sum(losses) / self.n_nets


def check_meta_gradient(model, distiller, rdata, rlabel):
    """Max relative difference: manual reverse pass vs. autograd through the whole unroll."""
    distiller.optimizer.zero_grad(set_to_none=False)
    steps = distiller.get_steps()
    final, ws, gws = distiller.forward(rdata, rlabel, steps)
    distiller.accumulate_grad([distiller.backward(final, ws, gws, steps)])
    manual = [p.grad.clone() for p in distiller.params]

    w = model.flat_w
    for data, label, lr in distiller.get_steps():
        loss = F.cross_entropy(model.forward_with_param(data, w), label)
        g, = torch.autograd.grad(loss, w, create_graph=True)
        w = w - lr.squeeze() * g
    ref = torch.autograd.grad(F.cross_entropy(model.forward_with_param(rdata, w), rlabel),
                              distiller.params)
    distiller.optimizer.zero_grad(set_to_none=False)
    return max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(manual, ref))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experiment", default="mnist_fixed_init_paper", choices=list(EXPERIMENTS))
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--real_batch", type=int, default=1024)
    ap.add_argument("--check", action="store_true", help="also check the meta-gradient once")
    ap.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_default_device(args.device)
    on_gpu = torch.device(args.device).type == "cuda"
    # their StepLR.step() comes before optimizer.step() (pre-1.1 PyTorch convention); keep it quiet
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
    torch.manual_seed(1)
    np.random.seed(1)
    model = LeNet().flatten_weights().reset_xavier(1.0)
    steps, n_nets, random_init = EXPERIMENTS[args.experiment]
    distiller = AuthorsStyleDistiller(model, steps=steps, n_nets=n_nets, random_init=random_init)
    batches = [(torch.randn(args.real_batch, NC, INPUT_SIZE, INPUT_SIZE),
                torch.randint(0, NUM_CLASSES, (args.real_batch,))) for _ in range(4)]
    per_pass = math.ceil(60000 / args.real_batch)  # their StepLR is stepped at each pass start

    load_before = os.getloadavg()[0]
    check = check_meta_gradient(model, distiller, *batches[0]) if args.check else None
    times, losses = [], []
    for it in range(args.warmup + args.iterations):
        rdata, rlabel = batches[it % len(batches)]
        t = time.perf_counter()
        loss = distiller.outer_iteration(rdata, rlabel, new_pass=(it % per_pass == 0))
        if on_gpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        losses.append(float(loss))
        if it >= args.warmup:
            times.append(dt)
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    row = {"implementation": "pytorch, authors' algorithm (flat-param LeNet, manual meta-backward)",
           "experiment": args.experiment, "n_nets": n_nets, "median_s": float(med), "q1_s": float(q1),
           "q3_s": float(q3), "iterations": args.iterations, "warmup": args.warmup,
           "T": distiller.T, "n_images": sum(d.shape[0] for d in distiller.data),
           "real_batch": args.real_batch, "device": args.device, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "first_loss": losses[0], "last_loss": losses[-1],
           "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
           "machine": {"platform": platform.platform(), "python": platform.python_version(),
                       "cpus": os.cpu_count(),
                       "malloc": "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system"}}
    if check is not None:
        row["meta_grad_max_rel_diff_vs_autograd"] = check
    print(json.dumps(row))


if __name__ == "__main__":
    main()
