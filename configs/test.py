"""Tiny config for the tests: a few steps of a tiny U-Net on tiny synthetic images."""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "synth_fundus"
    config.data.source_domains = ("Domain1", "Domain2")
    config.data.target_domains = ("Domain3",)
    config.data.image_size = 32
    config.data.builder_config = {"num_train": 8, "num_test": 4, "size": 48}
    config.model.widths = (4, 8, 16)
    config.batch_size = 8
    config.num_train_steps = 4
    config.log_every_steps = 2
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    config.eval.batch_size = 8
    config.eval.num_panels = 1
    config.loss.num_samples = 3
    config.eval.num_samples = 3
    config.compile_cache_dir = ""  # the tests write nothing outside their temporary folders
    return config
