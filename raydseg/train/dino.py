"""DINO self-distillation (Caron et al. 2021, facebookresearch/dino main_dino.py): the pure parts.

- `cosine_schedule`: per-step values (lr with linear warmup, weight decay 0.04 -> 0.4, teacher momentum -> 1);
- `teacher_temp_schedule`: linear warmup 0.04 -> 0.07, then constant;
- `DINOLoss`: cross-entropy between the centred, sharpened teacher distribution of each global crop and the student
  distribution of every *other* crop; the center is an EMA (momentum 0.9) of the teacher outputs, all-reduced
  across DDP ranks, or (`centering="sinkhorn"`) the teacher distribution is balanced over the batch by
  Sinkhorn-Knopp, as DINOv2 does (Oquab et al. 2023);
- `MultiCrop`: 2 global + n local crops of one image (torchvision.transforms.v2 on uint8 tensors): random resized
  crop, flip, colour jitter, grayscale, Gaussian blur, solarisation;
- `DinoStep`: the step function (raydseg.train.engine) of the `pretrain` stage;
- `param_groups`, `clip_gradients`, `cancel_last_layer_gradients`: the optimiser details of the official code.
No Ray here (torch + torchvision + numpy), so the same code runs on a machine with torch and timm only.

Steps replace the official epochs: every epoch-denominated setting is given in steps here.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from raydseg.models.segmenter import normalize


def cosine_schedule(base: float, final: float, steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
                    ) -> np.ndarray:
    """(steps,) float64: linear warmup from `warmup_start` to `base` over `warmup_steps`, then a half cosine from
    `base` to `final` over the remaining steps (the last value is `final` exactly)."""
    warmup_steps = min(max(warmup_steps, 0), steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    n = steps - warmup_steps
    if n <= 0:
        return warm[:steps]
    t = np.arange(n) / max(n - 1, 1)
    return np.concatenate([warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * t))])


def teacher_temp_schedule(warmup_temp: float, temp: float, steps: int, warmup_steps: int) -> np.ndarray:
    """(steps,) teacher temperatures: linear from `warmup_temp` to `temp` over `warmup_steps`, then `temp`."""
    warmup_steps = min(max(warmup_steps, 0), steps)
    return np.concatenate([np.linspace(warmup_temp, temp, warmup_steps), np.full(steps - warmup_steps, temp)])


class DINOLoss(nn.Module):
    """DINO loss with centering and sharpening.

    forward(student_out (n_crops * B, K), teacher_out (n_global * B, K), step) -> scalar: the mean over the
    (global crop i, any crop j != i) pairs of  sum_k -p_t,i[k] log p_s,j[k]  averaged over the batch, with
    p_t = softmax((teacher - center) / teacher_temp[step]) and p_s = softmax(student / student_temp). Updates the
    center afterwards (no gradient): center <- m * center + (1 - m) * mean of teacher_out over every rank.
    centering="sinkhorn": p_t = sinkhorn_knopp(teacher, teacher_temp[step]) instead (no center is used).
    """

    def __init__(self, out_dim: int, n_crops: int, teacher_temps: Sequence[float] | np.ndarray,
                 student_temp: float = 0.1, center_momentum: float = 0.9, n_global: int = 2,
                 centering: str = "ema"):
        super().__init__()
        self.n_crops, self.n_global, self.centering = n_crops, n_global, centering
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.teacher_temps = np.asarray(teacher_temps, dtype=np.float64)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.last_teacher_entropy = float("nan")

    def teacher_temp(self, step: int) -> float:
        return float(self.teacher_temps[min(max(step, 0), len(self.teacher_temps) - 1)])

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, step: int) -> torch.Tensor:
        student_out = student_out.float() / self.student_temp
        s_chunks = student_out.chunk(self.n_crops)
        teacher_out = teacher_out.float().detach()
        if self.centering == "sinkhorn":
            q = sinkhorn_knopp(teacher_out, self.teacher_temp(step))
        else:
            q = F.softmax((teacher_out - self.center) / self.teacher_temp(step), dim=-1)
        t_chunks = q.chunk(self.n_global)
        total, n_terms = student_out.new_zeros(()), 0
        for i, qi in enumerate(t_chunks):
            for j, sj in enumerate(s_chunks):
                if j == i:
                    continue  # the same view for teacher and student
                total = total + torch.sum(-qi * F.log_softmax(sj, dim=-1), dim=-1).mean()
                n_terms += 1
        with torch.no_grad():
            self.last_teacher_entropy = float(-(q * torch.log(q.clamp_min(1e-12))).sum(-1).mean())
        self.update_center(teacher_out)
        return total / max(n_terms, 1)

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_sum = teacher_out.sum(dim=0, keepdim=True)
        count = torch.tensor([float(len(teacher_out))], device=teacher_out.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_sum)
            torch.distributed.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn_knopp(teacher_out: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """(B, K) logits -> (B, K) teacher targets whose rows sum to 1 and whose prototypes share the global batch
    (every rank's rows) equally: DINOv2's Sinkhorn-Knopp centering. The batch cannot collapse onto one prototype,
    and images that differ keep different targets (the EMA centre subtracts a trailing batch mean instead)."""
    q = torch.exp((teacher_out.float() - teacher_out.float().max()) / temp).t()  # (K, B)
    n_prototypes = q.shape[0]
    n_samples = float(_all_reduce(torch.tensor([q.shape[1]], dtype=torch.float32, device=q.device)))
    q /= _all_reduce(q.sum())
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True)) * n_prototypes
        q /= q.sum(dim=0, keepdim=True) * n_samples
    return (q * n_samples).t()


JITTER = (0.4, 0.4, 0.2, 0.1)  # DINO's colour jitter: brightness, contrast, saturation, hue
JITTER_P, GRAYSCALE_P, SOLARIZE_P = 0.8, 0.2, 0.2  # probabilities (solarisation: the second global crop only)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma, torchvision's weights."""
    return (x * x.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)).sum(1, keepdim=True)


def colour_ops(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter with per-image parameters, on a float batch x (B, 3, H, W) in [0, 1].

    factors (B, 4): brightness, contrast, saturation (multipliers) and hue (shift in turns); order (B, 4): each
    image's permutation of the four ops (0..3 in that naming). Each op is torchvision's adjust_* formula on a float
    image (clamped to [0, 1]); hue goes through its RGB <-> HSV conversion."""
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

    f = factors.to(x.dtype).view(-1, 4, 1, 1, 1)
    for k in range(4):
        op = order[:, k].view(-1, 1, 1, 1)
        bright = x * f[:, 0]
        contrast = f[:, 1] * x + (1 - f[:, 1]) * _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        sat = f[:, 2] * x + (1 - f[:, 2]) * _gray(x)
        hsv = _rgb_to_hsv(x.clamp(0, 1))
        hue = _hsv_to_rgb(torch.cat([(hsv[:, :1] + f[:, 3]).remainder(1.0), hsv[:, 1:]], 1))
        x = torch.where(op == 0, bright, torch.where(op == 1, contrast, torch.where(op == 2, sat, hue))).clamp(0, 1)
    return x


def device_photometric(x: torch.Tensor, solarize: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """MultiCrop's colour part for a batch on the training device: colour jitter (p JITTER_P, each image its own
    factors and op order), grayscale (p GRAYSCALE_P) and, when `solarize`, solarisation (p SOLARIZE_P) of a float
    batch (B, 3, H, W) in [0, 1]. Parameters come from the CPU `generator` (default: torch's), so they do not
    depend on the device."""
    b = len(x)
    u = torch.rand(b, 7, generator=generator)
    lo = torch.tensor([1 - JITTER[0], 1 - JITTER[1], 1 - JITTER[2], -JITTER[3]])
    factors = lo + u[:, :4] * torch.tensor([2 * JITTER[0], 2 * JITTER[1], 2 * JITTER[2], 2 * JITTER[3]])
    order = torch.argsort(torch.rand(b, 4, generator=generator), dim=1)
    dev = x.device
    jittered = colour_ops(x, factors.to(dev), order.to(dev))
    x = torch.where((u[:, 4] < JITTER_P).to(dev).view(-1, 1, 1, 1), jittered, x)
    x = torch.where((u[:, 5] < GRAYSCALE_P).to(dev).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
    if solarize:  # torchvision's solarize of uint8 at 128: pixels >= 128/255 inverted
        flip = (u[:, 6] < SOLARIZE_P).to(dev).view(-1, 1, 1, 1) & (x >= 128 / 255)
        x = torch.where(flip, 1 - x, x)
    return x


def _blur_kernel(size: int) -> int:
    """Odd Gaussian kernel of about a tenth of the crop side (at least 3 px)."""
    return max(3, int(size * 0.1) // 2 * 2 + 1)


class MultiCrop:
    """2 global + `n_local` local crops of one image, as in DataAugmentationDINO (bicubic random resized crops;
    flip p 0.5; colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8; grayscale p 0.2; Gaussian blur sigma 0.1-2: global 1 p
    1.0, global 2 p 0.1, local p 0.5; solarisation of global 2 p 0.2).

    __call__(image (3, H, W) uint8 tensor) -> [global_1, global_2, local_1, ...], uint8 (3, size, size) tensors.
    Scales are fractions of the image area (torchvision's RandomResizedCrop); the torch global RNG drives them.
    `photometric=False` drops the colour jitter, grayscale and solarisation (crops, flips and blur stay);
    `blur=False` drops the blur (a masked autoencoder's crops: resized crop and flip only).
    """

    def __init__(self, global_size: int = 224, local_size: int = 96, n_local: int = 8,
                 global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
                 photometric: bool = True, blur: bool = True):
        from torchvision.transforms import v2

        def flip_jitter():
            colour = [v2.RandomApply([v2.ColorJitter(*JITTER)], p=JITTER_P), v2.RandomGrayscale(p=GRAYSCALE_P)]
            return [v2.RandomHorizontalFlip(p=0.5)] + (colour if photometric else [])

        def blur_(size: int, p: float) -> list:
            return [v2.RandomApply([v2.GaussianBlur(kernel_size=_blur_kernel(size), sigma=(0.1, 2.0))], p=p)] \
                if blur else []

        def rrc(size: int, scale: tuple[float, float]):
            return v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)

        self.n_local = n_local
        self.global_1 = v2.Compose([rrc(global_size, global_scale), *flip_jitter(), *blur_(global_size, 1.0)])
        self.global_2 = v2.Compose([rrc(global_size, global_scale), *flip_jitter(), *blur_(global_size, 0.1)]
                                   + ([v2.RandomSolarize(threshold=128, p=SOLARIZE_P)] if photometric else []))
        self.local = v2.Compose([rrc(local_size, local_scale), *flip_jitter(), *blur_(local_size, 0.5)])

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [self.global_1(image), self.global_2(image)] + [self.local(image) for _ in range(self.n_local)]


def crop_names(n_local: int) -> list[str]:
    """Batch keys of the crops, in the order the loss expects: global_0, global_1, local_0, ..."""
    return ["global_0", "global_1"] + [f"local_{i}" for i in range(n_local)]


def multicrop_batch(images: Sequence[np.ndarray], crop: MultiCrop) -> dict[str, np.ndarray]:
    """(H, W, 3) uint8 images -> {crop name: (B, 3, s, s) uint8} (one MultiCrop draw per image)."""
    views = [crop(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)) for im in images]
    names = crop_names(crop.n_local)
    return {name: torch.stack([v[i] for v in views]).numpy() for i, name in enumerate(names)}


class DinoStep:
    """The `pretrain` objective: batch {global_0, global_1, local_0.. : (B, 3, s, s) uint8} -> DINO loss.

    The teacher (the EMA of the student, no gradient) sees the global crops only; the student sees every crop.
    `photometric_on_device`: the crops come without MultiCrop's colour part, which `device_photometric` applies here
    on the batch's device (solarisation on the second global crop only, as MultiCrop).
    Metrics: teacher_entropy (nats, of the centred, sharpened teacher distribution; log K = uniform, 0 = one-hot).
    """

    def __init__(self, teacher: nn.Module, loss: DINOLoss, n_local: int, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, photometric_on_device: bool = False):
        self.teacher, self.loss, self.names = teacher, loss, crop_names(n_local)
        self.mean, self.std, self.photometric_on_device = list(mean), list(std), photometric_on_device

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        views = [batch[n] for n in self.names]
        if self.photometric_on_device:
            views = [device_photometric(v.float() / 255, n == "global_1") * 255 for v, n in zip(views, self.names)]
        crops = [normalize(v, self.mean, self.std) for v in views]
        with torch.no_grad():
            teacher_out = self.teacher(crops[:2])
        student_out = model(crops)
        loss = self.loss(student_out, teacher_out, step)
        return loss, {"teacher_entropy": self.loss.last_teacher_entropy,
                      "teacher_temp": self.loss.teacher_temp(step)}


def param_groups(model: nn.Module) -> list[dict]:
    """Two AdamW groups as in the official code: weights (decayed, by the schedule) and biases / norms (ndim 1,
    no decay). Frozen parameters (the fixed weight-norm magnitude) are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_gradients(model: nn.Module, clip: float) -> float:
    """Per-parameter gradient-norm clipping of the official code (each parameter's gradient scaled to norm <= clip,
    not the global norm). Returns the global gradient norm before clipping."""
    norms = []
    for p in model.parameters():
        if p.grad is None:
            continue
        n = p.grad.detach().norm(2)
        norms.append(n)
        if clip > 0:
            coef = clip / (float(n) + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)
    return float(torch.stack(norms).norm(2)) if norms else 0.0


def cancel_last_layer_gradients(model: nn.Module, step: int, freeze_steps: int) -> None:
    """Drop the head's last-layer gradients during the first `freeze_steps` steps (official: the first epoch)."""
    if step >= freeze_steps:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None
