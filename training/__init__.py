"""Training (torch): teacher -> student -> res-students -> baselines, into a run directory (`reskd train`,
`reskd sweep`, `reskd device-train`).

- recipe.py        a run's every hyperparameter, validated (training/recipes/*.toml)
- pipeline.py      `reskd train`: the stages in order, checkpointed and resumable, then evaluation and report
- loop.py          one training loop for every stage (SGD, schedules, autocast, channels_last, resumable epochs)
- losses.py        what each kind of stage optimises (KD, residual, features)
- models.py        the classifiers, built by name
- data.py          datasets and their train / validation / test splits
- batches.py       batches from a split: shuffling, augmentation, normalisation
- flops.py         FLOPs and parameters per model
- rundir.py        the run directory's layout and checkpoint format
- report.py        accuracy with intervals, FLOPs, the adaptive curve -> report.json / .md / pareto.png
- sweep.py         `reskd sweep`: recipe variants sharing identical stages (training/sweeps/*.toml)
- device_train.py  `reskd device-train`: the reference on a GPU host in resumable steps (training/plans/*.toml)
"""
