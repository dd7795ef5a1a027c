"""Prostate MRI, leave one site out: `--config configs/prostate.py:<SITE>[,cpu][,nifti]`.

SITE is one of RUNMC, BMC, I2CVB, UCL, BIDMC, HK; it is held out and the five others are the
sources. Inputs are 2.5-D: each axial slice with one neighbour on each side as 3 channels
(`data.context_slices=1`); metrics are computed on the re-stacked volumes.

Two releases (the `nifti` flag picks the second):
  * `prostate_slices` (default): the ProstateSlice PNGs, `<SITE>/{train,test}/{image,mask}`.
    Sources train on `train` and are validated on `test`; the target reports its `test` split.
    (Its `train` split cannot be added to the report: both splits number their cases from 00.)
  * `prostate` (`nifti`): the SAML NIfTI volumes, split by patient 80/20 into
    `train`/`validation`. Sources train on `train` and are validated on `validation`; the target
    reports all its cases (`train+validation`): none of them was seen in training.

Two budgets:
  * paper scale (default): 384x384 slices, U-Net widths 32-512, batch 8, 20k steps.
  * `cpu`: 128x128 slices (the 384x384 slices resized), widths 16-32-64-128-256, batch 8,
    2000 steps (the fundus CPU budget's input size and cost per step; fundus moved to 4000
    steps on its learning curves, prostate has no multi-site validation here to choose a budget
    on, so it stays a smoke-test budget); Adam 1e-3 with polynomial decay (power 0.9).

  python -m puseg_jax.main --config configs/prostate.py:BIDMC,cpu --workdir W \\
      --config.data.manual_dir=../shared/data/prostate_slices [--config.method=erm]
"""

import ml_collections

from configs import default
from configs.fundus import parse_arg

SITES = ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK")

# Representative arguments (tests/test_configs.py loads the file with each).
CONFIG_ARGS = list(SITES) + [f"{s},cpu" for s in SITES] + ["BIDMC,nifti", "BIDMC,cpu,nifti"]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The experiment of target site `arg` (e.g. 'BIDMC', 'BIDMC,cpu', 'BIDMC,cpu,nifti')."""
    target, flags = parse_arg(arg, SITES, ("cpu", "nifti"))
    sources = tuple(s for s in SITES if s != target)

    config = default.get_config()
    config.method = "ours"
    d = config.data
    d.manual_dir = ""  # pass --config.data.manual_dir=<folder with the six site folders>
    d.source_domains = sources
    d.target_domains = (target,)
    d.context_slices = 1  # 2.5-D: 3 input channels
    d.train_split = "train"
    if "nifti" in flags:
        d.name = "prostate"
        d.val_split = "validation"
        d.target_split = "train+validation"
    else:
        d.name = "prostate_slices"
        d.val_split = "test"
        d.target_split = "test"
    # Builder arguments used when a site is prepared: the ProstateSlice I2CVB/train folder has an
    # image without a mask and a mask without an image, which are left out (with a warning).
    d.builder_options = ml_collections.ConfigDict({"skip_unpaired": True})
    # config.evals stays empty: derived from the domains and splits (see configs/fundus.py).

    config.optim.learning_rate = 1e-3
    config.optim.poly_power = 0.9
    config.batch_size = 8
    config.model_selection = "last"

    if "cpu" in flags:
        d.image_size = 128
        config.model.widths = (16, 32, 64, 128, 256)
        config.num_train_steps = 2000
        config.log_every_steps = 50
        config.eval_every_steps = 500
        config.checkpoint_every_steps = 500
    else:
        d.image_size = 384
        config.model.widths = (32, 64, 128, 256, 512)
        config.num_train_steps = 20000
        config.log_every_steps = 100
        config.eval_every_steps = 2000
        config.checkpoint_every_steps = 2000
    return config
