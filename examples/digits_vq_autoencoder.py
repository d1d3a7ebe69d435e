"""A VQ autoencoder on scikit-learn's bundled digits (8 x 8 images, no download).

encoder -> VectorQuantizer (depthwise: 4 groups of 8 features, 32 codes each, EMA codebooks,
k-means init, dead-code restart) -> decoder, trained on the reconstruction MSE plus the commitment
loss (VQ-VAE eq. 3). Runs on the CPU in a few seconds, prints the test reconstruction MSE and the
codebook perplexity, and saves a PNG of test originals above their reconstructions.

    python examples/digits_vq_autoencoder.py [--epochs 30] [--out digits_vq_reconstructions.png]
"""
from __future__ import annotations

import torch
from torch import nn

from _digits import arguments, load_digits, save_image_grid
from protokernels.nn import VectorQuantizer


class VQAutoencoder(nn.Module):
    def __init__(self, dim: int = 32, codebook_size: int = 32, groups: int = 4):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, dim))
        self.quantizer = VectorQuantizer(dim, codebook_size, groups, kmeans_init=True,
                                         decay=0.9, dead_code_threshold=0.5)
        self.decoder = nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, 64))

    def forward(self, x):
        quantized, indices, commitment = self.quantizer(self.encoder(x))
        return self.decoder(quantized), indices, commitment


@torch.no_grad()
def evaluate(model: VQAutoencoder, images: torch.Tensor) -> tuple[float, float]:
    """Reconstruction MSE and mean codebook perplexity (over groups) on `images`."""
    model.eval()
    recon, indices, _ = model(images)
    counts = nn.functional.one_hot(indices, model.quantizer.codebook_size).sum(0).float()
    p = counts / counts.sum(-1, keepdim=True)
    perplexity = torch.exp(-(p * p.clamp_min(1e-30).log()).sum(-1)).mean().item()
    model.train()
    return nn.functional.mse_loss(recon, images).item(), perplexity


def save_reconstructions(model: VQAutoencoder, images: torch.Tensor, path: str) -> None:
    with torch.no_grad():
        model.eval()
        recon = model(images)[0].clamp(0, 1)
    save_image_grid(path, torch.cat([images, recon]).view(-1, 8, 8),
                    "digits: originals (top) and VQ reconstructions (bottom)", rows=2,
                    value_range=(0, 1))


def main(argv=None) -> dict:
    args = arguments(__doc__, epochs=30, out="digits_vq_reconstructions.png", argv=argv)
    x_train, _, x_test, _ = load_digits(args.seed)
    train, test = x_train.flatten(1), x_test.flatten(1)  # 64 pixels per image
    model = VQAutoencoder()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    start_mse, _ = evaluate(model, test)
    for epoch in range(args.epochs):
        for batch in train[torch.randperm(len(train))].split(128):
            recon, _, commitment = model(batch)
            loss = nn.functional.mse_loss(recon, batch) + commitment
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            mse, perplexity = evaluate(model, test)
            print(f"epoch {epoch + 1:3d}: test reconstruction MSE {mse:.4f}, "
                  f"codebook perplexity {perplexity:.1f} of {model.quantizer.codebook_size}")
    mse, perplexity = evaluate(model, test)
    if args.out:
        save_reconstructions(model, test[:10], args.out)
        print(f"saved {args.out}")
    return {"start_mse": start_mse, "mse": mse, "perplexity": perplexity}


if __name__ == "__main__":
    main()
