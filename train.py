"""Compose the Hydra config and train (stabletrain/cli/train.py).

python train.py model.n_layers=8 trainer.max_steps=500
torchrun --nproc_per_node 2 train.py engine=zero2
python train.py -m optim.lr=3e-4,1e-3          # a sweep, one job after another
"""

from stabletrain.cli.train import main

if __name__ == "__main__":
    main()
