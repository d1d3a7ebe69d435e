"""GLVQ and RSLVQ prototype heads on a small CNN, on scikit-learn's bundled digits (no download).

The encoder's features are classified by the nearest of 2 labelled prototypes per class
(protokernels.nn.PrototypeClassifier, one fused search); the network trains end to end on the
head's loss: GLVQ's relative distance with a sigmoid transfer (prototype-layers..., eq. 20) or
RSLVQ's Gaussian-mixture likelihood ratio (eq. 19). Prints each head's test accuracy; runs on the
CPU in seconds.

    python examples/digits_lvq.py [--epochs 15] [--head glvq] [--head rslvq]
"""
from __future__ import annotations

import torch

from _digits import arguments, conv_encoder, load_digits, minibatches
from protokernels.nn import GLVQLoss, PrototypeClassifier, RSLVQLoss

HEADS = {"glvq": lambda: GLVQLoss("sigmoid", beta=5.0), "rslvq": lambda: RSLVQLoss(sigma=1.0)}


def train(head_name: str, epochs: int, seed: int, data) -> float:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    encoder = conv_encoder(16)
    head = PrototypeClassifier(16, 10, prototypes_per_class=2, criterion=HEADS[head_name]())
    with torch.no_grad():
        head.init_from(encoder(x_train), y_train)
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for batch in minibatches(len(y_train), 64, generator):
            loss = head.loss(encoder(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracy = (head(encoder(x_test)) == y_test).float().mean().item()
        print(f"{head_name} epoch {epoch + 1:2d}: loss {loss.item():.3f}, test accuracy "
              f"{accuracy:.3f}")
    return accuracy


def main(argv=None) -> dict:
    args = arguments(__doc__, epochs=15, out=None, argv=argv, more=lambda parser: parser.add_argument(
        "--head", action="append", choices=tuple(HEADS), help="(repeatable; default: both)"))
    data = load_digits(args.seed)
    return {name: train(name, args.epochs, args.seed, data) for name in args.head or HEADS}


if __name__ == "__main__":
    main()
