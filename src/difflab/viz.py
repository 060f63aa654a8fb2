"""Pictures people would rather look at than numbers: schedule plots and loss curves (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from difflab.schedules import SCHEDULE_NAMES, Schedule  # noqa: E402


def plot_schedules(path: str | Path, T: int = 1000) -> Path:
    """alpha_bar and log-SNR against t for every named schedule (and zero terminal SNR)."""
    fig, (ax_ab, ax_snr) = plt.subplots(1, 2, figsize=(11, 4))
    variants = [(n, False) for n in SCHEDULE_NAMES] + [("linear", True), ("cosine", True)]
    for name, ztsnr in variants:
        s = Schedule.make(name, T=T, zero_terminal_snr=ztsnr)
        t = range(T)
        style = "--" if ztsnr else "-"
        ax_ab.plot(t, s.alpha_bar.numpy(), style, label=s.name)
        ax_snr.plot(t, s.log_snr.numpy(), style, label=s.name)
    ax_ab.set(xlabel="t", ylabel="alpha_bar(t)", title="signal kept")
    ax_snr.set(xlabel="t", ylabel="log SNR(t)", title="log signal-to-noise ratio")
    ax_ab.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curve(values: dict[str, list[float]], path: str | Path, xlabel: str = "step", log_y: bool = True) -> Path:
    """One or more named curves against their index (loss curves)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in values.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_samples(x, path: str | Path) -> Path:
    """A picture of a batch of samples: an image grid, or a scatter plot for 2-D points."""
    import math

    path = Path(path)
    if x.ndim == 2 and x.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=2, alpha=0.5)
        ax.set_aspect("equal")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
    from difflab.data.images import save_grid

    return save_grid(x, path, nrow=math.ceil(math.sqrt(x.shape[0])))


def save_labelled_grid(
    x, path: str | Path, labels: list[str] | None = None, nrow: int | None = None, min_size: int = 96
) -> Path:
    """A grid PNG people can read: each image (B, C, H, W) in [-1, 1] enlarged by an integer
    factor (nearest neighbour, so pixels stay pixels) to at least `min_size`, with its label or
    caption, wrapped, under it."""
    import math
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    from difflab.data.images import to_uint8_images

    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"save_labelled_grid expects (B, C, H, W) images with C in (1, 3), got {tuple(x.shape)}")
    if labels is not None and len(labels) != x.shape[0]:
        raise ValueError(f"got {len(labels)} labels for {x.shape[0]} images")
    batch, _, height, width = x.shape
    factor = max(1, math.ceil(min_size / max(height, width)))
    cell_w, cell_h = width * factor, height * factor
    font = ImageFont.load_default(size=11)
    chars = max(8, cell_w // 6)  # about 6 px per character at this size
    lines = [textwrap.wrap(str(label), chars)[:3] for label in labels] if labels is not None else [[]] * batch
    text_h = 13 * max(len(ls) for ls in lines) + (4 if labels is not None else 0)
    cols = nrow or math.ceil(math.sqrt(batch))
    rows, pad = math.ceil(batch / cols), 4
    sheet = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (cell_h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    pixels = to_uint8_images(x).permute(0, 2, 3, 1).numpy()
    for i in range(batch):
        image = Image.fromarray(pixels[i, :, :, 0] if pixels.shape[3] == 1 else pixels[i]).convert("RGB")
        left = pad + (i % cols) * (cell_w + pad)
        top = pad + (i // cols) * (cell_h + text_h + pad)
        sheet.paste(image.resize((cell_w, cell_h), Image.Resampling.NEAREST), (left, top))
        for k, line in enumerate(lines[i]):
            draw.text((left, top + cell_h + 2 + 13 * k), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path
