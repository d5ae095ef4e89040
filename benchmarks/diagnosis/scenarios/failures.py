"""Failing runs: one training bug each, labelled with the codes that name its primary cause."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.diagnosis import kit
from benchmarks.diagnosis.scenario import Run, Scenario


def _run(model, train, val, batch_size=32, seed=0, epochs=4, shuffle=True, monitor="val_loss", **trainer):
    train_dl, val_dl = kit.loaders(train, val, batch_size=batch_size, seed=seed, shuffle=shuffle)
    trainer = {"max_epochs": epochs, **trainer}
    return Run(model, train_dl, val_dl if monitor else None, trainer, monitor=monitor)


# -- learning rate ------------------------------------------------------------------------------------------------
def adam_lr5_cnn(seed):
    train, val = kit.digits_images(seed)
    return _run(kit.Task(kit.SmallCNN(), lr=5.0), train, val, seed=seed, epochs=3)


def sgd_lr_too_high_mlp(seed):
    train, val = kit.digits(seed)
    return _run(kit.Task(kit.mlp([64, 128, 10]), optimizer="sgd", lr=3.0), train, val, seed=seed, epochs=3)


def regression_lr_too_high(seed):
    train, val = kit.regression(seed)
    return _run(
        kit.Task(kit.mlp([8, 64, 64, 1]), loss="mse", optimizer="sgd", lr=0.5, momentum=0.9),
        train,
        val,
        seed=seed,
        epochs=4,
    )


def transformer_no_warmup(seed):
    train, val, vocab = kit.text_tokens(seed)
    net = kit.TinyTransformer(vocab)
    return _run(kit.Task(net, loss="lm", optimizer="adam", lr=0.05), train, val, seed=seed, epochs=8)


def lstm_lr_too_high(seed):
    train, val, vocab = kit.text_tokens(seed)
    return _run(
        kit.Task(kit.RNNLM(vocab), loss="lm", optimizer="sgd", lr=20.0, momentum=0.9),
        train,
        val,
        seed=seed,
        epochs=3,
    )


def lr_rising_schedule(seed):
    train, val = kit.digits(seed)
    task = kit.Task(kit.mlp([64, 64, 10]), optimizer="sgd", lr=0.01, scheduler="exp_up", gamma=1.06)
    return _run(task, train, val, seed=seed, epochs=4)


def lr_far_too_low_adam(seed):
    train, val = kit.digits(seed)
    return _run(kit.Task(kit.mlp([64, 64, 10]), lr=1e-6), train, val, seed=seed, epochs=5)


def lr_far_too_low_sgd(seed):
    train, val = kit.blobs(seed)
    return _run(
        kit.Task(kit.mlp([16, 32, 4]), optimizer="sgd", lr=1e-5, momentum=0.0),
        train,
        val,
        seed=seed,
        epochs=6,
    )


def lr_too_low_regression(seed):
    train, val = kit.regression(seed)
    return _run(
        kit.Task(kit.mlp([8, 32, 1]), loss="mse", optimizer="sgd", lr=1e-5, momentum=0.0),
        train,
        val,
        seed=seed,
        epochs=6,
    )


# -- gradients ----------------------------------------------------------------------------------------------------
def deep_sigmoid_vanishing(seed):
    train, val = kit.digits(seed)
    net = kit.mlp([64] + [32] * 13 + [10], act=nn.Sigmoid)
    return Run(
        kit.Task(net, optimizer="sgd", lr=0.01), *kit.loaders(train, val, seed=seed), {"max_steps": 48}
    )


def deep_tanh_small_init(seed):
    train, val = kit.digits(seed)
    net = kit.mlp([64] + [64] * 8 + [10], act=nn.Tanh, init_std=0.02)
    return _run(kit.Task(net, optimizer="sgd", lr=0.05), train, val, seed=seed, epochs=3)


def init_too_small_relu(seed):
    train, val = kit.blobs(seed)
    net = kit.mlp([16] + [64] * 6 + [4], init_std=1e-3)
    return _run(kit.Task(net, optimizer="sgd", lr=0.05), train, val, seed=seed, epochs=4)


def deep_relu_large_init(seed):
    train, val = kit.digits(seed)
    net = kit.mlp([64] + [128] * 10 + [10], init_std=0.5)
    return _run(kit.Task(net, optimizer="sgd", lr=1e-3), train, val, seed=seed, epochs=2)


def init_too_large_mlp(seed):
    train, val = kit.blobs(seed)
    net = kit.mlp([16, 128, 128, 4], init_std=3.0)
    return _run(kit.Task(net, optimizer="sgd", lr=0.01), train, val, seed=seed, epochs=3)


def deep_regression_exploding(seed):
    train, val = kit.regression(seed)
    net = kit.mlp([8] + [64] * 8 + [1], init_std=0.35)
    return _run(kit.Task(net, loss="mse", optimizer="sgd", lr=1e-3), train, val, seed=seed, epochs=3)


def manual_never_zero_grad(seed):
    train, val = kit.digits(seed)
    task = kit.Task(kit.mlp([64, 64, 10]), optimizer="sgd", lr=0.05, momentum=0.0, manual_no_zero_grad=True)
    return _run(task, train, val, seed=seed, epochs=3)


def manual_never_zero_grad_adam(seed):
    train, val = kit.regression(seed)
    task = kit.Task(
        kit.mlp([8, 64, 1]), loss="mse", optimizer="sgd", lr=0.01, momentum=0.9, manual_no_zero_grad=True
    )
    return _run(task, train, val, seed=seed, epochs=4)


class _Frozen(nn.Module):
    """A body whose output is detached from the graph: its weights never get a gradient."""

    def __init__(self, sizes, detach=True):
        super().__init__()
        self.body = kit.mlp(sizes[:-1])
        self.act = nn.ReLU()
        self.head = nn.Linear(sizes[-2], sizes[-1])
        self.detach = detach

    def forward(self, x):
        h = self.act(self.body(x))
        return self.head(h.detach() if self.detach else h)


def detached_body(seed):
    train, val = kit.digits(seed)
    return _run(kit.Task(_Frozen([64, 64, 64, 10])), train, val, seed=seed, epochs=3)


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = kit.mlp([16, 32, 4])
        self.aux_head = nn.Linear(32, 4)  # built, registered, optimised, never called

    def forward(self, x):
        return self.net(x)


def unused_head(seed):
    train, val = kit.blobs(seed)
    return _run(kit.Task(_Unused()), train, val, seed=seed, epochs=3)


class _NoGradEncoder(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.lm = kit.RNNLM(vocab)

    def forward(self, x):
        with torch.no_grad():
            e = self.lm.embed(x)
        out, _ = self.lm.rnn(e)
        return self.lm.head(out)


def embedding_under_no_grad(seed):
    train, val, vocab = kit.text_tokens(seed)
    return _run(kit.Task(_NoGradEncoder(vocab), loss="lm", lr=3e-3), train, val, seed=seed, epochs=2)


# -- loss -----------------------------------------------------------------------------------------------------------
def _softmax(out: torch.Tensor) -> torch.Tensor:
    return torch.softmax(out, dim=-1)


def softmax_before_ce(seed):
    train, val = kit.digits(seed)
    net = nn.Sequential(kit.mlp([64, 64, 10]), nn.Softmax(dim=-1))  # a softmax as the model's last layer
    return _run(kit.Task(net, optimizer="sgd", lr=0.05), train, val, seed=seed, epochs=4)


def softmax_before_ce_cnn(seed):
    train, val = kit.digits_images(seed)
    task = kit.Task(
        kit.SmallCNN(), optimizer="sgd", lr=0.02, forward_hook=_softmax
    )  # softmax at the end of forward
    return _run(task, train, val, seed=seed, epochs=3)


def sigmoid_before_bce_logits(seed):
    train, val = kit.moons(seed)
    return _run(
        kit.Task(kit.mlp([2, 32, 32, 1]), loss="bce", optimizer="sgd", lr=0.05, output_bug="sigmoid"),
        train,
        val,
        seed=seed,
        epochs=15,
    )


def nan_from_log(seed):
    train, val = kit.moons(seed, noise=0.05)
    return _run(
        kit.Task(kit.mlp([2, 64, 64, 1]), loss="bce", lr=0.1, loss_bug="log"),
        train,
        val,
        seed=seed,
        epochs=10,
    )


def nan_from_sqrt(seed):
    train, val = kit.regression(seed)
    return _run(
        kit.Task(kit.mlp([8, 32, 1]), loss="mse", lr=1e-2, loss_bug="sqrt"), train, val, seed=seed, epochs=3
    )


def nan_from_division(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 8, generator=g)
    y = torch.round(x[:, :1])  # integer targets: y - y.round() is exactly 0, the loss divides by it
    ds = TensorDataset(x, y)
    train, val = torch.utils.data.random_split(ds, [384, 128], generator=g)
    return _run(
        kit.Task(kit.mlp([8, 32, 1]), loss="mse", lr=1e-2, loss_bug="div"), train, val, seed=seed, epochs=2
    )


def output_bias_wrong_init(seed):
    train, val = kit.digits(seed)
    net = kit.mlp([64, 64, 10])
    with torch.no_grad():
        net[-1].bias.copy_(torch.linspace(-20, 20, 10))
    return _run(kit.Task(net, optimizer="sgd", lr=1e-3), train, val, seed=seed, epochs=2)


def mse_on_class_ids(seed):
    """Class ids regressed with MSE at a huge output scale: the initial loss is far from log(C)."""
    train, val = kit.digits(seed)
    net = kit.mlp([64, 64, 10], init_std=2.0)
    return _run(kit.Task(net, optimizer="sgd", lr=1e-4), train, val, seed=seed, epochs=2)


# -- data -------------------------------------------------------------------------------------------------------------
def slow_per_sample_loading(seed):
    train, val = kit.blobs(seed, n=400)
    slow = kit.SlowDataset(train, delay=0.002)
    dl = DataLoader(slow, batch_size=16, shuffle=True)
    return Run(kit.Task(kit.mlp([16, 32, 4])), dl, DataLoader(val, batch_size=256), {"max_steps": 40})


def slow_loader_short_run(seed):
    train, _ = kit.digits(seed)
    slow = kit.SlowDataset(train, delay=0.004)
    dl = DataLoader(slow, batch_size=16, shuffle=True)
    return Run(kit.Task(kit.mlp([64, 32, 10])), dl, None, {"max_steps": 8}, monitor=None)


def slow_collate(seed):
    train, _ = kit.digits(seed)

    def collate(items):
        import time

        time.sleep(0.03)
        return torch.utils.data.default_collate(items)

    dl = DataLoader(train, batch_size=32, shuffle=True, collate_fn=collate)
    return Run(kit.Task(kit.mlp([64, 64, 10])), dl, None, {"max_steps": 30}, monitor=None)


def nan_in_inputs(seed):
    x, y = kit.digits(seed)[0].tensors
    x = x.clone()
    g = torch.Generator().manual_seed(seed)
    x[torch.randint(0, len(x), (40,), generator=g), 3] = float("nan")  # missing values left as NaN
    train, val = kit._split(x, y, seed)
    return _run(kit.Task(kit.mlp([64, 64, 10])), train, val, seed=seed, epochs=2)


def unnormalised_inputs(seed):
    train, val = kit.regression(seed, scale=300.0)
    return _run(
        kit.Task(kit.mlp([8, 64, 1]), loss="mse", optimizer="sgd", lr=1e-3), train, val, seed=seed, epochs=3
    )


def raw_pixel_inputs(seed):
    x, y = kit._digits_raw()
    train, val = kit._split(x * 16.0, y, seed)  # 0..255 pixel values fed as they are
    return _run(kit.Task(kit.mlp([64, 64, 10]), optimizer="sgd", lr=0.01), train, val, seed=seed, epochs=2)


def sorted_labels_no_shuffle(seed):
    train, val = kit.digits(seed)
    x, y = train.tensors
    order = torch.argsort(y, stable=True)
    train = TensorDataset(x[order], y[order])
    return _run(kit.Task(kit.mlp([64, 64, 10])), train, val, seed=seed, epochs=3, shuffle=False)


class _BatchMix(nn.Module):
    """Normalises each feature over the batch inside forward (a hand-rolled 'BatchNorm' in eval too)."""

    def __init__(self, sizes):
        super().__init__()
        self.net = kit.mlp(sizes)

    def forward(self, x):
        x = (x - x.mean(0, keepdim=True)) / (x.std(0, keepdim=True) + 1e-5)
        return self.net(x)


def batch_mixing_forward(seed):
    train, val = kit.blobs(seed)
    return _run(kit.Task(_BatchMix([16, 32, 4])), train, val, seed=seed, epochs=3)


class _ViewBug(nn.Module):
    """A transpose where a reshape was meant: samples of the batch get mixed."""

    def __init__(self):
        super().__init__()
        self.net = kit.mlp([64, 64, 10])

    def forward(self, x):
        b = x.shape[0]
        return self.net(x.t().reshape(b, -1))


def transpose_instead_of_reshape(seed):
    train, val = kit.digits(seed)
    return _run(kit.Task(_ViewBug()), train, val, seed=seed, epochs=2)


def corrupt_batches(seed):
    train, val = kit.regression(seed)
    task = kit.Task(kit.mlp([8, 64, 1]), loss="mse", lr=3e-3, bad_batch_at=60, bad_batch_every=25)
    return _run(task, train, val, seed=seed, epochs=8)


# -- capacity / regularisation --------------------------------------------------------------------------------------
def weight_decay_too_strong(seed):
    train, val = kit.digits(seed)
    return _run(
        kit.Task(kit.mlp([64, 64, 10]), optimizer="adamw", lr=1e-2, weight_decay=50.0),
        train,
        val,
        seed=seed,
        epochs=6,
    )


def l2_too_strong_sgd(seed):
    train, val = kit.blobs(seed)
    return _run(
        kit.Task(kit.mlp([16, 64, 4]), optimizer="sgd", lr=0.05, weight_decay=5.0),
        train,
        val,
        seed=seed,
        epochs=6,
    )


def dropout_too_strong(seed):
    train, val = kit.digits(seed)
    return _run(kit.Task(kit.mlp([64, 64, 64, 10], dropout=0.97), lr=1e-3), train, val, seed=seed, epochs=6)


def model_too_small(seed):
    train, val = kit.digits(seed)
    return _run(kit.Task(kit.mlp([64, 1, 10]), lr=1e-2), train, val, seed=seed, epochs=6)


def overfit_small_data(seed):
    train, val = kit.digits(seed, n=240, label_noise=0.2)
    return _run(
        kit.Task(kit.mlp([64, 512, 512, 10]), lr=3e-3), train, val, batch_size=16, seed=seed, epochs=25
    )


def overfit_noisy_labels_big_model(seed):
    train, val = kit.digits(seed, label_noise=0.5, n=300)
    return _run(
        kit.Task(kit.mlp([64, 512, 512, 10]), lr=3e-3), train, val, batch_size=16, seed=seed, epochs=20
    )


def overfit_then_early_stop(seed):
    train, val = kit.blobs(seed, n=160, features=32, spread=6.0)
    return _run(kit.Task(kit.mlp([32, 512, 512, 4]), lr=3e-3), train, val, batch_size=8, seed=seed, epochs=25)


def lstm_overfit_tiny_text(seed):
    train, val, vocab = kit.text_tokens(seed, n=80)
    return _run(
        kit.Task(kit.RNNLM(vocab, hidden=256), loss="lm", lr=1e-2),
        train,
        val,
        batch_size=8,
        seed=seed,
        epochs=15,
    )


F = "failure"
SCENARIOS: list[Scenario] = [
    Scenario(
        "adam_lr5_cnn",
        F,
        ("exploding_gradients", "divergence", "loss_spike"),
        "Adam at lr=5 on a small CNN: the first steps throw the weights off and gradients collapse to 0 (lr-finder threads, 'loss stuck at ln(10)')",
        adam_lr5_cnn,
        fast=True,
    ),
    Scenario(
        "sgd_lr_too_high_mlp",
        F,
        ("exploding_gradients", "divergence", "loss_spike", "non_finite_loss"),
        "SGD at lr=3 on an MLP: the loss blows up in the first epoch (CS231n 'babysitting the learning process')",
        sgd_lr_too_high_mlp,
    ),
    Scenario(
        "regression_lr_too_high",
        F,
        ("exploding_gradients", "divergence", "loss_spike", "non_finite_loss"),
        "SGD+momentum at lr=0.5 on an unscaled MSE regression diverges to inf",
        regression_lr_too_high,
    ),
    Scenario(
        "transformer_no_warmup",
        F,
        ("exploding_gradients", "divergence", "loss_spike", "loss_plateau", "underfitting"),
        "a post-LN transformer with Adam at lr=0.05 and no warmup (Xiong et al. 2020; 'transformer loss explodes without warmup' threads)",
        transformer_no_warmup,
    ),
    Scenario(
        "lstm_lr_too_high",
        F,
        ("exploding_gradients", "divergence", "loss_spike", "non_finite_loss"),
        "an LSTM LM with SGD lr=20 and no clipping (the classic exploding RNN gradient, Pascanu et al.)",
        lstm_lr_too_high,
    ),
    Scenario(
        "lr_rising_schedule",
        F,
        ("divergence", "exploding_gradients", "loss_spike", "non_finite_loss"),
        "a scheduler stepped with the wrong sign/gamma: the lr grows 6% per step until training diverges",
        lr_rising_schedule,
    ),
    Scenario(
        "lr_far_too_low_adam",
        F,
        ("loss_plateau", "underfitting"),
        "Adam at lr=1e-6 (a typo in the exponent): the loss barely moves",
        lr_far_too_low_adam,
        fast=True,
    ),
    Scenario(
        "lr_far_too_low_sgd",
        F,
        ("loss_plateau", "underfitting"),
        "plain SGD at lr=1e-5: the loss creeps down at a constant tiny rate",
        lr_far_too_low_sgd,
    ),
    Scenario(
        "lr_too_low_regression",
        F,
        ("loss_plateau", "underfitting"),
        "MSE regression with SGD lr=1e-5: no visible progress in 6 epochs",
        lr_too_low_regression,
    ),
    Scenario(
        "deep_sigmoid_vanishing",
        F,
        ("vanishing_gradients",),
        "a 14-layer sigmoid nn.Sequential in 48 steps: early layers get ~0 gradient (Glorot & Bengio 2010)",
        deep_sigmoid_vanishing,
        fast=True,
    ),
    Scenario(
        "deep_tanh_small_init",
        F,
        ("vanishing_gradients", "loss_plateau", "underfitting", "activation_scale"),
        "a 9-layer tanh MLP initialised with std 0.02: the signal and gradients shrink layer by layer",
        deep_tanh_small_init,
    ),
    Scenario(
        "init_too_small_relu",
        F,
        ("vanishing_gradients", "loss_plateau", "underfitting", "activation_scale"),
        "a 7-layer ReLU MLP initialised with std 1e-3: activations and gradients are ~0",
        init_too_small_relu,
    ),
    Scenario(
        "deep_relu_large_init",
        F,
        (
            "exploding_gradients",
            "non_finite_loss",
            "non_finite_gradients",
            "divergence",
            "loss_at_init",
            "activation_scale",
        ),
        "an 11-layer ReLU MLP initialised with std 0.5: gradient norm ~1e5+ at step 0 (He init paper)",
        deep_relu_large_init,
        fast=True,
    ),
    Scenario(
        "init_too_large_mlp",
        F,
        ("loss_at_init", "exploding_gradients"),
        "weights initialised with std 3: the initial loss is far above ln(C) and saturated",
        init_too_large_mlp,
    ),
    Scenario(
        "deep_regression_exploding",
        F,
        ("exploding_gradients", "divergence", "non_finite_loss", "loss_at_init"),
        "a 9-layer ReLU regressor with std 0.35 init: gradients explode from step 0",
        deep_regression_exploding,
    ),
    Scenario(
        "manual_never_zero_grad",
        F,
        ("exploding_gradients", "divergence", "stale_gradients"),
        "manual optimisation without optimizer.zero_grad(): gradients accumulate forever (Lightning manual-optimisation threads)",
        manual_never_zero_grad,
    ),
    Scenario(
        "manual_never_zero_grad_momentum",
        F,
        ("exploding_gradients", "divergence", "stale_gradients", "non_finite_loss"),
        "manual optimisation, SGD+momentum, no zero_grad on a regression",
        manual_never_zero_grad_adam,
    ),
    Scenario(
        "detached_body",
        F,
        ("missing_gradients",),
        "features .detach()-ed before the head: the body never trains (PyTorch forum 'my layers do not update')",
        detached_body,
        fast=True,
    ),
    Scenario(
        "unused_head",
        "healthy",
        (),
        "look-alike: an auxiliary head registered and optimised but never used in forward; the loss ignores it and "
        "the model learns (missing_gradients is info; under DDP without find_unused_parameters it is an error)",
        unused_head,
    ),
    Scenario(
        "embedding_under_no_grad",
        F,
        ("missing_gradients",),
        "the embedding lookup wrapped in torch.no_grad(): the embedding never learns",
        embedding_under_no_grad,
    ),
    Scenario(
        "softmax_before_ce",
        F,
        ("loss_plateau", "underfitting", "vanishing_gradients", "loss_at_init"),
        "softmax applied before nn.CrossEntropyLoss (which applies log-softmax itself): tiny, saturated gradients",
        softmax_before_ce,
        fast=True,
    ),
    Scenario(
        "softmax_before_ce_cnn",
        F,
        ("loss_plateau", "underfitting", "vanishing_gradients", "loss_at_init"),
        "the same double softmax on a small CNN",
        softmax_before_ce_cnn,
    ),
    Scenario(
        "sigmoid_before_bce_logits",
        F,
        ("loss_plateau", "underfitting", "vanishing_gradients", "loss_at_init"),
        "sigmoid before BCEWithLogitsLoss: the loss cannot go below ~0.31 and learning stalls",
        sigmoid_before_bce_logits,
    ),
    Scenario(
        "nan_from_log",
        F,
        ("non_finite_loss", "non_finite_gradients"),
        "BCE written by hand as -(y log p + (1-y) log(1-p)): p = sigmoid(z) rounds to 1.0, log(0) = -inf, 0 * inf = NaN",
        nan_from_log,
        fast=True,
    ),
    Scenario(
        "nan_from_sqrt",
        F,
        ("non_finite_gradients", "non_finite_loss"),
        "sqrt of a squared error: the gradient of sqrt at 0 is inf (distance losses)",
        nan_from_sqrt,
    ),
    Scenario(
        "nan_from_division",
        F,
        ("non_finite_loss", "non_finite_gradients"),
        "a loss divided by a batch statistic that is exactly 0 (normalised losses, std of a constant)",
        nan_from_division,
    ),
    Scenario(
        "output_bias_wrong_init",
        F,
        ("loss_at_init",),
        "the output layer's bias initialised to a wide ramp: the initial loss is far above ln(10) (Karpathy's recipe: 'verify loss @ init')",
        output_bias_wrong_init,
        fast=True,
    ),
    Scenario(
        "large_logit_scale_init",
        F,
        ("loss_at_init", "exploding_gradients"),
        "logits at a huge scale from init (std 2 weights): confident wrong predictions, loss far above ln(C)",
        mse_on_class_ids,
    ),
    Scenario(
        "slow_per_sample_loading",
        F,
        ("dataloader_bound",),
        "a Dataset.__getitem__ that decodes each sample slowly, num_workers=0 (PyTorch performance tuning guide)",
        slow_per_sample_loading,
        fast=True,
    ),
    Scenario(
        "slow_loader_short_run",
        F,
        ("dataloader_bound",),
        "an 8-step run whose loader sleeps per sample: the wait must be seen before the first logging step",
        slow_loader_short_run,
    ),
    Scenario(
        "slow_collate",
        F,
        ("dataloader_bound",),
        "an expensive collate_fn in the main process (padding/tokenising at batch time)",
        slow_collate,
    ),
    Scenario(
        "nan_in_inputs",
        F,
        ("non_finite_input",),
        "missing values left as NaN in the features (tabular data)",
        nan_in_inputs,
        fast=True,
    ),
    Scenario(
        "unnormalised_inputs",
        F,
        ("input_scale",),
        "features on a scale of hundreds fed without standardisation",
        unnormalised_inputs,
    ),
    Scenario(
        "raw_pixel_inputs",
        F,
        ("input_scale",),
        "raw 0-255 pixel values (forgot ToTensor()/255 normalisation)",
        raw_pixel_inputs,
        fast=True,
    ),
    Scenario(
        "sorted_labels_no_shuffle",
        F,
        ("label_distribution",),
        "a dataset sorted by class, shuffle=False: every batch is a single class",
        sorted_labels_no_shuffle,
        fast=True,
    ),
    Scenario(
        "batch_mixing_forward",
        F,
        ("batch_dependence",),
        "features normalised over the batch inside forward: a sample's output depends on its batch mates",
        batch_mixing_forward,
    ),
    Scenario(
        "transpose_instead_of_reshape",
        F,
        ("batch_dependence",),
        "x.t().reshape(b, -1) where x.reshape(b, -1) was meant: samples are mixed (the classic view/permute bug)",
        transpose_instead_of_reshape,
        fast=True,
    ),
    Scenario(
        "corrupt_batches",
        F,
        ("loss_spike", "exploding_gradients"),
        "a few corrupt batches (targets x1000, a unit bug in one shard) hit a healthy run",
        corrupt_batches,
        fast=True,
    ),
    Scenario(
        "weight_decay_too_strong",
        F,
        ("underfitting", "loss_plateau"),
        "AdamW with weight_decay=50: the weights are held at ~0 and the model cannot learn",
        weight_decay_too_strong,
        fast=True,
    ),
    Scenario(
        "l2_too_strong_sgd",
        F,
        ("underfitting", "loss_plateau"),
        "SGD with weight_decay=5 (a value meant for a different parameterisation)",
        l2_too_strong_sgd,
    ),
    Scenario(
        "dropout_too_strong",
        F,
        ("underfitting", "loss_plateau"),
        "dropout p=0.97 (keep-prob passed where drop-prob is expected)",
        dropout_too_strong,
    ),
    Scenario(
        "model_too_small",
        F,
        ("underfitting", "loss_plateau", "cannot_overfit_batch"),
        "a 1-unit bottleneck: too little capacity for 10 classes",
        model_too_small,
    ),
    Scenario(
        "overfit_small_data",
        F,
        ("overfitting",),
        "a 500k-parameter MLP on 120 digits for 25 epochs: validation loss turns up",
        overfit_small_data,
        fast=True,
    ),
    Scenario(
        "overfit_noisy_labels_big_model",
        F,
        ("overfitting",),
        "a big MLP memorising 50% noisy labels",
        overfit_noisy_labels_big_model,
    ),
    Scenario(
        "overfit_then_early_stop",
        F,
        ("overfitting",),
        "overlapping clusters, a big model, EarlyStop on val_loss: the stop is caused by overfitting",
        overfit_then_early_stop,
    ),
    Scenario(
        "lstm_overfit_tiny_text",
        F,
        ("overfitting",),
        "a wide LSTM on 60 text windows for 15 epochs memorises them",
        lstm_overfit_tiny_text,
    ),
]
