"""Image helpers shared by the diffusion modules and callbacks: grids, PIL images and PNG files, logger
images, edge maps."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["edge_map", "log_image_grid", "make_grid", "save_png", "to_pil", "to_unit_range"]


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model images to [0, 1] for metrics and files."""
    return (images.detach().float() / 2 + 0.5).clamp(0, 1)


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> one (C, H', W') grid (torchvision's layout)."""
    from torchvision.utils import make_grid as tv_make_grid

    return tv_make_grid(images.cpu(), nrow=nrow, padding=padding)


def to_pil(image: torch.Tensor):
    """A (C, H, W) [0, 1] tensor as an 8-bit ``PIL.Image`` (grey for one channel)."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write a (C, H, W) [0, 1] tensor as an 8-bit PNG, via a temporary file so no half-written PNG is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    to_pil(image).save(tmp, format="PNG")
    tmp.replace(path)
    return path


def log_image_grid(logger, tag: str, grid: torch.Tensor, step: int) -> bool:
    """Log a (C, H, W) [0, 1] grid on loggers that take images (TensorBoard, W&B, MLflow...); False otherwise."""
    if logger is None:
        return False
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "add_image"):  # TensorBoard
        experiment.add_image(tag, grid, global_step=step)
        return True
    if hasattr(logger, "log_image"):  # W&B, Neptune, MLflow...
        logger.log_image(key=tag, images=[grid.permute(1, 2, 0).cpu().numpy()], step=step)
        return True
    return False


def edge_map(images: torch.Tensor, threshold: float | None = 0.2) -> torch.Tensor:
    """Sobel gradient magnitude of the luminance, (B, 1, H, W) in [0, 1]; binarised above ``threshold``.

    ControlNet's default conditioning image: derived from the data itself, so no annotation is needed.
    """
    gray = (0.299 * images[:, 0:1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3]) / 2 + 0.5
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device)
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1).to(images.dtype)
    grads = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = grads.pow(2).sum(1, keepdim=True).sqrt() / 4.0
    if threshold is None:
        return magnitude.clamp(0, 1)
    return (magnitude > threshold).to(images.dtype)
