"""Train the CXR-Phantom classifier on CPU (a few minutes) and save it to weights/phantom-classifier/.

    python scripts/train_phantom_classifier.py [--out weights/phantom-classifier] [--n-train 10000]

Training images come from phantom data set seed `--seed` (indices 0..n_train-1), held-out images from
seed `--seed + 1`, so no held-out image was seen in training. Everything is seeded: the same arguments
give the same weights on the same machine and torch version.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from unix.eval.phantom_classifier import ClassifierConfig, PhantomClassifier, evaluate, phantom_arrays, save_classifier, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="weights/phantom-classifier")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--gen-size", type=int, default=256, help="phantom image size, resized to the input size like eval images")
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    start = time.time()
    x_train, y_train = phantom_arrays(args.seed, 0, args.n_train, args.gen_size, args.input_size)
    x_test, y_test = phantom_arrays(args.seed + 1, 0, args.n_test, args.gen_size, args.input_size)
    print(f"generated {args.n_train} + {args.n_test} images in {time.time() - start:.0f} s")
    model = PhantomClassifier(ClassifierConfig(input_size=args.input_size))
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters")
    losses = train(model, x_train, y_train, epochs=args.epochs, seed=args.seed)
    result = evaluate(model, x_test, y_test)
    for name, value in result["auroc"].items():
        print(f"  {name:<28} AUROC {value:.4f}" if value is not None else f"  {name:<28} AUROC n/a")
    print(f"mean AUROC {result['mean_auroc']:.4f} on {result['n']} held-out images")
    info = {"train": {"data_seed": args.seed, "n": args.n_train, "gen_size": args.gen_size, "epochs": args.epochs,
                      "final_loss": losses[-1], "seconds": round(time.time() - start)},
            "held_out": {"data_seed": args.seed + 1, **result}, "torch": torch.__version__}
    folder = save_classifier(model, args.out, info)
    print(f"saved {folder} ({time.time() - start:.0f} s total)")
    print(json.dumps({"mean_auroc": result["mean_auroc"]}))


if __name__ == "__main__":
    main()
