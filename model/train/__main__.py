"""`python -m model.train` and `torchrun -m model.train`: the training CLI (model/train/trainer.py)."""

import sys

from model.train.trainer import main

if __name__ == "__main__":
    sys.exit(main())
