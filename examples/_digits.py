"""What the digits examples share: scikit-learn's bundled digits (8 x 8 images, no download), a
small convolutional encoder and the command line."""
from __future__ import annotations

import argparse

import torch
from torch import nn


def load_digits(seed: int):
    """(train images, train labels, test images, test labels): (N, 1, 8, 8) in [0, 1], 80/20."""
    from sklearn.datasets import load_digits as sklearn_digits
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(labels))
    train, test = order[:split], order[split:]
    return images[train], labels[train], images[test], labels[test]


def arguments(doc: str, epochs: int, out: str | None, argv=None,
              more=lambda parser: None) -> argparse.Namespace:
    """--epochs, --seed, (when the example writes one) --out PNG, and what `more` adds."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--seed", type=int, default=0)
    if out is not None:
        parser.add_argument("--out", default=out, help="PNG to write ('' to skip)")
    more(parser)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    return args


def conv_encoder(dim: int) -> nn.Module:
    """(N, 1, 8, 8) -> (N, dim): two conv/pool stages and a linear map."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # 16 x 4 x 4
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 32 x 2 x 2
        nn.Flatten(), nn.Linear(32 * 2 * 2, dim))


def minibatches(count: int, size: int, generator: torch.Generator):
    return torch.randperm(count, generator=generator).split(size)


def save_image_grid(path: str, images, title: str, rows: int = 1, labels=None,
                    value_range=None) -> None:
    """A PNG of grayscale images (n, h, w) in `rows` rows, each titled by its label if given."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = -(-len(images) // rows)
    fig, axes = plt.subplots(rows, columns, figsize=(columns, 1.15 * rows + 0.25), squeeze=False)
    vmin, vmax = value_range or (None, None)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i].numpy(), cmap="gray", vmin=vmin, vmax=vmax)
            if labels is not None:
                ax.set_title(str(int(labels[i])), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
