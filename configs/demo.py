"""The demo: synthetic fundus, sources Domain2-4, target Domain1, tiny U-Net at 64x64.

`python -m puseg_jax.main --config configs/demo.py --workdir W --config.method=erm`
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "synth_fundus"
    config.data.source_domains = ("Domain2", "Domain3", "Domain4")
    config.data.target_domains = ("Domain1",)
    config.data.image_size = 64
    config.model.widths = (8, 16, 32, 64, 128)
    config.batch_size = 16
    config.num_train_steps = 300
    # 300 steps are short: at 2e-3 Adam moves the logit bias too little for the background to
    # become confident, so uncertainty maps are flat (source-validation ECE 0.14-0.18).
    config.optim.learning_rate = 1e-2
    config.log_every_steps = 25
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 100
    config.loss.num_samples = 10
    return config
