"""Kernel-prototype convolutions on scikit-learn's bundled digits (8 x 8 images, no download).

A small network of KernelPrototypeConv2d layers (prototype-layers..., §6.2): each layer measures
how deep every 3 x 3 / 5 x 5 window lies inside the ball of each learned kernel-prototype
(relu(r^2 - d)), prototypes initialized from data windows (§8). Trains on the CPU in seconds,
prints the test accuracy and saves the first layer's prototypes as a PNG.

    python examples/digits_kpconv.py [--epochs 20] [--out digits_kpconv_prototypes.png]
"""
from __future__ import annotations

import torch
from torch import nn

from _digits import arguments, load_digits, minibatches, save_image_grid
from protokernels.nn import KernelPrototypeConv2d


class PrototypeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            KernelPrototypeConv2d(1, 16, 5, padding=2, radius=True, activation="ball_relu"),
            nn.BatchNorm2d(16), nn.MaxPool2d(2),                          # 16 x 4 x 4
            KernelPrototypeConv2d(16, 32, 3, padding=1, radius=True, activation="ball_relu"),
            nn.BatchNorm2d(32), nn.MaxPool2d(2),                          # 32 x 2 x 2
        )
        self.classifier = nn.Linear(32 * 2 * 2, 10)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, generator: torch.Generator) -> None:
        """Each prototype layer from windows of what reaches it (§8), in order."""
        for layer in self.features:
            if isinstance(layer, KernelPrototypeConv2d):
                layer.init_from(x, generator)
            x = layer(x)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def save_prototypes(layer: KernelPrototypeConv2d, path: str) -> None:
    prototypes = layer.weight.detach()[:, 0].cpu()
    save_image_grid(path, prototypes, "first-layer kernel-prototypes (5 x 5)", rows=2)


def main(argv=None) -> float:
    args = arguments(__doc__, epochs=20, out="digits_kpconv_prototypes.png", argv=argv)
    x_train, y_train, x_test, y_test = load_digits(args.seed)
    model = PrototypeNet()
    model.init_from(x_train[:256], torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        for batch in minibatches(len(y_train), 64, batches):
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1:2d}: train loss {loss.item():.3f}, test accuracy {accuracy:.3f}")
    if args.out:
        save_prototypes(model.features[0], args.out)
        print(f"saved the first layer's prototypes to {args.out}")
    return accuracy


if __name__ == "__main__":
    main()
