"""Deep positive-negative prototypes (DPNP) on scikit-learn's bundled digits (no download).

A small CNN maps images to 8 features; one prototype per class serves as the classifier's weight
and as the class centre (protokernels.nn.DPNPLoss: cross-entropy, a pull towards the own centre,
pushes from the nearest rival centre of each sample and of each centre, found by the fused search
with `exclude`; dpnp-positive-negative-prototypes, eq. 10). Prototypes go back onto their sphere
at every epoch. Prints the test accuracy and the smallest angle between class prototypes; runs on
the CPU in seconds.

    python examples/digits_dpnp.py [--epochs 15]
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from _digits import arguments, conv_encoder, load_digits, minibatches
from protokernels.nn import DPNPLoss


def main(argv=None) -> dict:
    args = arguments(__doc__, epochs=15, out=None, argv=argv)
    x_train, y_train, x_test, y_test = load_digits(args.seed)
    encoder = conv_encoder(8)
    head = DPNPLoss(10, 8, alpha=4.0, lambda_pos=0.05, lambda_neg_sample=0.05,
                    lambda_neg_class=0.05)
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=3e-3)
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        head.renormalize_()  # the prototypes back onto the sphere of radius alpha
        for batch in minibatches(len(y_train), 64, generator):
            loss = head(encoder(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracy = (head.logits(encoder(x_test)).argmax(1) == y_test).float().mean().item()
            unit = F.normalize(head.prototypes, dim=1)
            cosines = (unit @ unit.t()).fill_diagonal_(-1)
            min_angle = math.degrees(math.acos(cosines.max().clamp(-1, 1).item()))
        print(f"epoch {epoch + 1:2d}: loss {loss.item():.3f}, test accuracy {accuracy:.3f}, "
              f"smallest angle between class prototypes {min_angle:.1f} deg")
    return {"accuracy": accuracy, "min_angle": min_angle}


if __name__ == "__main__":
    main()
