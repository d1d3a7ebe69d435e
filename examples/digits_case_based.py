"""The case-based reasoning prototype network on scikit-learn's bundled digits (no download).

An autoencoder's latent codes go through a prototype layer (squared distances to 15 learned
prototypes, protokernels.nn.PrototypeLayer) and a linear classifier; the four-term objective
(case-based-reasoning..., eq. 7: cross-entropy, reconstruction, R1, R2 from the same distance
kernel as the classifier's input) makes the prototypes decodable into digit-like images. Prints the test accuracy and saves
the decoded prototypes as a PNG; runs on the CPU in seconds.

    python examples/digits_case_based.py [--epochs 60] [--out digits_case_based_prototypes.png]
"""
from __future__ import annotations

import torch
from torch import nn

from _digits import arguments, load_digits, minibatches, save_image_grid
from protokernels.nn import CaseBasedLoss, PrototypeLayer


class CaseBasedNet(nn.Module):
    def __init__(self, latent: int = 10, prototypes: int = 15):
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(),
                                     nn.Linear(128, latent), nn.Sigmoid())
        self.decoder = nn.Sequential(nn.Linear(latent, 128), nn.ReLU(), nn.Linear(128, 64),
                                     nn.Sigmoid(), nn.Unflatten(1, (1, 8, 8)))
        self.prototypes = PrototypeLayer(latent, prototypes)
        self.classifier = nn.Linear(prototypes, 10)

    def forward(self, x):
        """-> (logits, reconstruction, R1, R2): the distances and both regularizers from one
        distance kernel (PrototypeLayer.with_regularizers)."""
        z = self.encoder(x)
        distances, r1, r2 = self.prototypes.with_regularizers(z)
        return self.classifier(distances), self.decoder(z), r1, r2


def save_prototypes(model: CaseBasedNet, path: str) -> None:
    with torch.no_grad():
        images = model.decoder(model.prototypes.prototypes)[:, 0]
        # The class a prototype speaks for: the most negative weight on its distance (being near
        # it raises that class's logit most).
        classes = model.classifier.weight.argmin(0)
    save_image_grid(path, images, "decoded prototypes (title: the class each one speaks for)",
                    labels=classes, value_range=(0, 1))


def main(argv=None) -> float:
    args = arguments(__doc__, epochs=60, out="digits_case_based_prototypes.png", argv=argv)
    x_train, y_train, x_test, y_test = load_digits(args.seed)
    model = CaseBasedNet()
    objective = CaseBasedLoss(lambda_rec=0.05, lambda_r1=0.05, lambda_r2=0.05)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        for batch in minibatches(len(y_train), 128, generator):
            x = x_train[batch]
            logits, reconstruction, r1, r2 = model(x)
            loss = objective(logits, y_train[batch], reconstruction, x, r1, r2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            with torch.no_grad():
                accuracy = (model(x_test)[0].argmax(1) == y_test).float().mean().item()
            print(f"epoch {epoch + 1:3d}: loss {loss.item():.3f}, R1 {r1.item():.3f}, "
                  f"R2 {r2.item():.3f}, test accuracy {accuracy:.3f}")
    if args.out:
        save_prototypes(model, args.out)
        print(f"saved the decoded prototypes to {args.out}")
    return accuracy


if __name__ == "__main__":
    main()
