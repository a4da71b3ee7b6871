"""Default run: the paper's system on the embedded mnist5k digits (no network): λ = 8 learner threads of
μ = 16 (λμ = 128) on 8 CPU-emulated devices, 2-softsync (c = 4, ⟨σ⟩ ≈ 2), the staleness-aware `inverse`
policy, a small CNN. `--config.executor=pmap` gives the SSGD baseline with the same hyperparameters.

`python launch/train.py` runs this config. Override any key from the command line, e.g.
`python launch/train.py --config configs/default.py --config.learners=4 --config.batch_per_learner=32`.
Every other config file starts from this one, so this file lists every key sajax knows.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # data
  config.dataset = "mnist5k"          # mnist5k (embedded) | mnist | cifar10 | imagenet2012 | any TFDS name
  config.data_dir = ""                # TFDS data_dir ("" = TFDS's default, ~/tensorflow_datasets)
  config.download = False             # let TFDS download and prepare a missing dataset
  config.train_examples = 0           # use only the first N training examples (0 = all)
  config.model = "small_cnn"          # mlp | small_cnn | cifar10_full | alexnet
  # the paper's system
  config.executor = "threads"         # threads: λ learner threads + one parameter server | pmap: SSGD baseline
                                      # | simulated | mpi (under mpiexec) | ray (learners in Ray actors)
  config.protocol = "softsync"        # hardsync | softsync | async | ssp  (pmap is always hardsync, σ = 0)
  config.n = 2                        # n of n-softsync and ssp: c = ⌊λ/n⌋ gradients per update
  config.ssp_spread = 3               # s of ssp (bounded staleness, Ho et al. 2013): a learner more than s
                                      # accepted gradients ahead of the slowest live one waits (s = 0, n = 1: SSGD)
  config.learners = 8                 # λ
  config.batch_per_learner = 16       # μ
  config.policy = "inverse"           # staleness policy: inverse (α0/σ, the paper) | constant (plain ASGD) |
                                      # polynomial | exponential | hinge | delay_adaptive | drop | dc_asgd |
                                      # dc_asgd_adaptive | gap_aware (sajax/policies.py: formulas, references)
  config.policy_args = "{}"           # the policy's arguments as JSON, e.g. '{"a": 0.5}' (polynomial) or
                                      # '{"bound": 8}' (drop); unset ones take the paper's defaults, and
                                      # learners and learning_rate default to λ and α0
  # optimisation: SGD with momentum and a step schedule, as in the paper
  # α0 for a mini-batch of λμ examples. Momentum 0.5, not 0.9: with stale gradients (even σ ≈ 1) momentum
  # 0.9 at this α0 trained far slower here (docs/benchmarks.md); asynchrony itself acts like extra momentum.
  config.learning_rate = 0.05
  config.momentum = 0.5
  config.momentum_rule = "plain"      # plain (m ← βm + g, θ ← θ − αm) | delayed_nesterov (momentum once per N
                                      # gradients) | compensation (β − implicit 1 − 1/(1 + ⟨σ⟩)) | lookahead
                                      # (publish θ's estimated position at the gradient's arrival): sajax/momentum.py
  config.momentum_rule_period = 0     # N of delayed_nesterov, in gradients (0: λ, SSGD's momentum cadence)
  config.momentum_rule_staleness_decay = 0.99  # ρ per gradient of the smoothed ⟨σ⟩ (compensation, lookahead; 1: mean)
  config.weight_decay = 0.0
  # asynchronous local-SGD (sajax/local_steps.py): a learner runs H inner steps from θ_j and pushes Δ = θ_j − θ_local
  config.local_steps = 1              # H, mini-batches of μ per push (1: a plain gradient, the paper's system)
  config.inner_optimizer = "sgd"      # sgd | adamw: the learner's own optimizer for its H steps (state kept across pushes)
  config.inner_learning_rate = placeholder(float)  # α_inner (None: α0 for sgd, 1e-3 for adamw)
  config.inner_momentum = 0.0         # β of inner sgd
  config.inner_weight_decay = 0.0     # weight decay of the inner optimizer (decoupled for adamw)
  config.inner_schedule = "constant"  # constant | cosine (α_inner → 0 over the run's PS updates, by the version pulled)
  config.outer_optimizer = "sgd"      # the PS's optimizer of what learners push: sgd (α0, momentum, momentum_rule) |
                                      # nesterov (DiLoCo) | delayed_nesterov (Liu et al. 2024)
  config.outer_learning_rate = placeholder(float)  # None: α0 for sgd, 0.7 for nesterov and delayed_nesterov
  config.outer_momentum = placeholder(float)       # None: momentum for sgd, 0.9 for nesterov and delayed_nesterov
  config.dynamic_local_steps = False  # DyLU: learner k runs H_k = max(1, ⌊H·v_k/v_fastest⌋) steps per push (threads:
                                      # measured speeds; simulated: the speed model's)
  config.lr_boundaries_epochs = (13.33, 17.5)  # α ← α · lr_decay at each of these epochs (⅔ and ⅞ of them)
  config.lr_decay = 0.1
  config.lr_warmup_epochs = 0.0       # > 0: α ramps linearly from α0/W to α0 over the first W updates (these epochs)
  config.epochs = 20.0                # the most that fits the 60 s first run on 2 cores (docs/benchmarks.md)
  # bookkeeping
  config.eval_every_epochs = 1.0
  config.eval_batch_size = 1000
  config.checkpoint_every_epochs = 2.0
  config.keep_checkpoints = 3
  config.seed = 0
  config.progress = True              # progress bar on stderr
  config.plots = True                 # curves.png and staleness.png in the workdir when the run ends
  # faults (threads, simulated, mpi): a learner that raises is reported and the run goes on without it
  config.fail_fast = False            # stop the run instead when a learner raises
  config.fault_learner = -1           # fault injection for experiments: this learner raises (-1: none) ...
  config.fault_at_step = 0            # ... at this step of its own
  config.nan_learners = ()            # fault injection: these learners' gradients are NaN ...
  config.nan_at_step = 0              # ... from this step of their own ...
  config.nan_steps = 1                # ... for this many steps (0: every step from then on)
  # elastic learners (threads, simulated, ray; README "Elastic learners"): c re-derived from the live set
  config.elastic_min_learners = 1     # the run goes on while at least this many learners are live (else exit 4)
  config.elastic_max_learners = 0     # learner ids a join may take: 0..max-1 (0: λ)
  config.elastic_replace = False      # a learner that dies is replaced at once by a fresh one in its slot
  config.elastic_events = ""          # e.g. "leave 4-7 at run 1/3; join 4-7 at run 2/3" (or "at update U")
  # every run ends: divergence and bounded waits (docs/reliability.md)
  config.divergence_after = 100       # consecutive non-finite gradients that end the run as diverged (exit 3)
  config.mpi_timeout_s = 600.0        # executor=mpi: start-up/shutdown waits for another rank, then fail naming it
  config.fault_mpi_corrupt_weights = 0  # fault injection: rank 0 corrupts the first k weights messages to each rank
  config.fault_mpi_corrupt_permits = 0  # ... and (ssp) the first k permissions to start a gradient
  config.fault_mpi_corrupt_pushes = 0   # fault injection: each rank > 0 corrupts its first k gradients pushed
  config.fault_mpi_corrupt_version = 0  # fault injection: the first k weights messages to each rank carry a bad version
  # executor=ray (pip install 'sajax[ray]'): learners in Ray actors, the parameter server in this process
  config.ray_address = ""             # "" starts a local Ray (or joins RAY_ADDRESS) | "auto": the cluster that
                                      # `ray start` joined this node to | host:port of a cluster's head
  config.ray_learners_per_actor = 1   # learners per Ray actor (one process each; a GPU each where there are enough)
  # simulated executor: each learner's simulated time per gradient (sajax/executors/speed.py)
  config.sim_profile = ""             # "" (the keys below as they are) | one_slow (learner 0 sim_slowdown× slower)
                                      # | heterogeneous (sim_speeds, default 0.58, 0.75, 1.51, 3.33 s as in async
                                      # local-SGD, cycled over λ) | lognormal (mean-1 jitter of σ sim_jitter)
  config.sim_base_time = 1.0          # seconds of simulated time per gradient ...
  config.sim_example_time = 0.0       # ... or, when > 0, this many seconds per example (compute time ∝ μ) ...
  config.sim_push_time = 0.0          # ... plus this fixed time per push (communication), for every learner
  config.sim_jitter = 0.0             # σ of a lognormal factor per gradient (0: none; mean 1 in a named profile)
  config.sim_stragglers = 0.0         # fraction of learners (the lowest ids) that are slow ...
  config.sim_slowdown = 4.0           # ... by this factor
  config.sim_poisson = False          # exponential times with the same mean (Poisson arrivals)
  config.sim_speeds = ()              # or one time factor per learner (heterogeneous: a pattern of any length)
  # ... and its communication (sajax/executors/comm.py): each learner's own link, not scaled by the factors above
  config.sim_bandwidth = 0.0          # bytes per simulated second: a pull or a push of the d parameters (4·d bytes)
                                      # takes 4·d / sim_bandwidth (0: free) ...
  config.sim_latency = 0.0            # ... plus this many seconds per message
  return config
