"""Every config field, with its meaning and unit. Experiments import this and override."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # seeds parameters, data order, augmentation and sampling noise
    # erm | erm_nll | focal | topk | entropy | ours | ours_no_highlight (docs/method.md)
    config.method = "ours"

    # ---- data -------------------------------------------------------------------------------
    config.data = d = ml_collections.ConfigDict()
    d.name = "synth_fundus"  # dataset family (puseg_jax/core/datasets.py)
    d.data_dir = ""  # TFDS data dir; '' = $PUSEG_DATA_DIR or <repo>/tfds_data
    d.manual_dir = ""  # the downloaded release (real datasets only)
    # Fields of the domain's TFDS BuilderConfig that differ from the registered one (e.g.
    # fundus store_size, synthetic num_train); a variant is built into its own folder.
    d.builder_config = ml_collections.ConfigDict()
    # Arguments of the builder's constructor, e.g. {'skip_unpaired': True} for a release with
    # images lacking masks (ProstateSlice I2CVB); they change how a build treats defective input.
    d.builder_options = ml_collections.ConfigDict()
    d.source_domains = ("Domain2", "Domain3", "Domain4")  # trained on
    d.target_domains = ("Domain1",)  # held out; evaluated at the end only
    d.extra_domains = ()  # domains of your own (a new site's BuilderConfig) besides the family's
    d.train_split = "train"  # split of the source domains used for training
    d.val_split = "test"  # split of the source domains used for validation/selection
    d.target_split = "test"  # split of the target domains reported
    d.domain_weights = ()  # mixing weights of the source domains; () = equal
    d.image_size = 64  # network input, pixels (square)
    d.normalize = "zscore"  # per-image intensity normalisation: zscore | unit
    d.context_slices = 0  # 2.5-D: slices on each side stacked as channels (1 -> 3 channels)
    d.num_workers = 0  # grain worker processes (0 = in the main process)

    # ---- augmentation (training only; joint for image and mask) ------------------------------
    config.augment = a = ml_collections.ConfigDict()
    a.enabled = True
    a.scale = (0.9, 1.1)  # zoom factor range
    a.rotate_deg = 15.0  # max rotation, degrees
    a.flip = True  # random horizontal flip
    a.translate = 0.05  # max shift, fraction of the image size
    a.brightness = 0.1  # additive, on [0, 1] intensities
    a.contrast = 0.15  # multiplicative around the mean, +- fraction
    a.gamma = 0.2  # log-gamma range
    a.noise_std = 0.02  # max Gaussian noise std, on [0, 1] intensities

    # ---- model --------------------------------------------------------------------------------
    config.model = m = ml_collections.ConfigDict()
    m.widths = (32, 64, 128, 256, 512)  # channels per U-Net level (4 down-samplings)
    m.norm = "batch"  # batch | group
    m.dropout_rate = 0.0  # decoder dropout (needed for MC-dropout uncertainty)
    m.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    m.conv_impl = "auto"  # 3x3 convolution: auto | xla | fast (see conv_ops.py)
    m.remat = False  # recompute each U-Net block's activations in the backward pass (less memory)

    # ---- loss (docs/method.md) --------------------------------------------------------------
    config.loss = lo = ml_collections.ConfigDict()
    lo.num_samples = 10  # T, logit samples per pixel
    lo.alpha = 1.0  # weight of the uncertainty loss L_unc (erm_nll: of its sigma = 0 form)
    lo.lambda_max = 1.0  # highlight strength after the ramp (ours_no_highlight: 0)
    lo.ramp_fraction = 0.1  # t_r as a fraction of num_train_steps
    lo.onset_fraction = 0.0  # lambda = 0 before this fraction of num_train_steps, then the ramp
    # The variants of the highlighting of `ours` (and its ablation ours_no_highlight):
    # U from: entropy (of the sample mean) | sigma | mc_dropout (needs model.dropout_rate > 0)
    # | boundary_oracle (a diagnostic, never a default: the entropy's mean weight on the GT band)
    lo.uncertainty_source = "entropy"
    lo.oracle_band_px = 3  # k: the GT boundary band is the pixels within k network-input px
    lo.mc_passes = 3  # mc_dropout: extra dropout forward passes per step for U
    lo.highlight_terms = "ce"  # weighted by w: ce | ce+unc | ce+unc+dice
    lo.highlight_norm = "weighted_mean"  # weighted_mean: sum(wL)/sum(w) | mean: mean(wL)
    lo.highlight_top_q = 0.0  # 0 = off; q in (0, 1]: only the q most uncertain pixels per image
    lo.logvar_head = "per_class"  # log-variance channels: per_class (K) | shared (1)
    lo.dice_weight = 1.0  # weight of the soft Dice loss
    lo.dice_eps = 1e-5  # smoothing of the soft Dice
    lo.focal_gamma = 2.0  # focal baseline
    lo.topk_fraction = 0.2  # topk baseline: hardest fraction of pixels per image
    # Every N steps, log how strong the highlighting is (train/grad_share_top10u, ...); 0 = off.
    lo.diagnostics_every_steps = 0

    # ---- optimisation -------------------------------------------------------------------------
    config.batch_size = 8  # global batch, over all devices and processes
    config.num_train_steps = 2000
    config.optim = o = ml_collections.ConfigDict()
    o.learning_rate = 2e-3  # Adam peak learning rate
    o.poly_power = 0.9  # lr * (1 - t / T) ** power
    o.weight_decay = 0.0  # decoupled (AdamW) weight decay; 0 = Adam
    o.grad_clip_norm = 0.0  # global-norm clipping; 0 = off
    config.nan_policy = "raise"  # non-finite loss/grads: raise | skip (step skipped, counted)
    # Train steps per compiled call (a lax.scan over that many batches): removes the per-step
    # host round trip where steps are short (GPU/TPU). The log, checkpoint and eval cadences
    # must be multiples of it; the numbers are those of single steps.
    config.steps_per_call = 1
    # Persistent compilation cache: a second run of the same config loads its compiled steps
    # instead of compiling them. 'auto': $JAX_COMPILATION_CACHE_DIR when set, else a folder per
    # jax version and CPU under ~/.cache/puseg_jax (XDG_CACHE_HOME); a path: that folder;
    # '': off (JAX's default).
    config.compile_cache_dir = "auto"

    # ---- logging, evaluation, checkpoints ----------------------------------------------------
    config.log_every_steps = 50
    config.eval_every_steps = 500  # source-validation evaluation; 0 = only at the end
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 2  # last N kept (the source-validation best is kept apart)
    config.model_selection = "last"  # checkpoint reported: last | source_val (best source Dice)
    config.init_from = ""  # checkpoint dir to initialise params from when the workdir is empty
    # Resuming a checkpoint written with a config that differs in a field that changes the
    # computation is an error (puseg_jax/core/config_diff.py); True resumes anyway (rare,
    # deliberate).
    config.allow_config_change = False

    config.eval = e = ml_collections.ConfigDict()
    e.batch_size = 16  # global evaluation batch (padded, nothing dropped)
    e.threshold = 0.5  # sigmoid threshold (fundus; the peers' 0.75 is an option)
    e.largest_component = True  # keep the largest connected component per structure
    e.uncertainty = "samples"  # samples (T draws of the logit heads) | mc_dropout
    e.num_samples = 10  # draws for the uncertainty map at evaluation
    e.save_predictions = True  # eval/<domain>/predictions.npz for the notebook
    e.num_panels = 4  # PNG panels per evaluated domain
    e.boundary_width = 2  # pixels of the scored grid, band for boundary/interior uncertainty
    e.resolution = "native"  # score on: native (released/original grid) | network (input grid)

    # Named evaluators, filled by `puseg_jax.train.config.resolve_evals` when left empty:
    # {name: {domain, split, role}} with role 'target' or 'source_val'.
    config.evals = ml_collections.ConfigDict()

    # ---- devices -----------------------------------------------------------------------------
    config.parallel = p = ml_collections.ConfigDict()
    p.strategy = "jit"  # jit (shard_map over a mesh) | pmap
    p.num_devices = 0  # 0 = all devices
    p.distributed = "auto"  # auto: jax.distributed.initialize() on detected clusters | off
    p.coordinator_address = ""  # host:port for explicit multi-process runs
    p.num_processes = 1
    p.process_id = 0
    p.cpu_collectives = ""  # e.g. 'gloo' for multi-process CPU runs
    return config
