"""Healthy runs that look unusual: each must end with no warning/error finding."""

from __future__ import annotations

from torch.utils.data import DataLoader

from benchmarks.diagnosis import kit
from benchmarks.diagnosis.scenario import Run, Scenario


def _run(model, train, val, batch_size=32, seed=0, epochs=4, monitor="val_loss", **trainer):
    train_dl, val_dl = kit.loaders(train, val, batch_size=batch_size, seed=seed)
    trainer = {"max_epochs": epochs, **trainer}
    return Run(model, train_dl, val_dl if monitor else None, trainer, monitor=monitor)


def sgd_momentum_mlp(seed):
    train, val = kit.digits(seed)
    return _run(
        kit.Task(kit.mlp([64, 128, 10]), optimizer="sgd", lr=0.05, momentum=0.9),
        train,
        val,
        seed=seed,
        epochs=4,
    )


def batch_size_8(seed):
    train, val = kit.digits(seed, n=800)
    return _run(
        kit.Task(kit.mlp([64, 64, 10]), optimizer="sgd", lr=0.02, momentum=0.9),
        train,
        val,
        batch_size=8,
        seed=seed,
        epochs=3,
    )


def batch_size_4_adam(seed):
    train, val = kit.moons(seed, n=400)
    return _run(kit.Task(kit.mlp([2, 32, 32, 2]), lr=3e-3), train, val, batch_size=4, seed=seed, epochs=3)


def lstm_tokens(seed):
    train, val, vocab = kit.text_tokens(seed)
    return _run(kit.Task(kit.RNNLM(vocab, "lstm"), loss="lm", lr=5e-3), train, val, seed=seed, epochs=4)


def gru_tokens_sgd(seed):
    train, val, vocab = kit.text_tokens(seed)
    return _run(
        kit.Task(kit.RNNLM(vocab, "gru"), loss="lm", optimizer="sgd", lr=0.5, momentum=0.9),
        train,
        val,
        batch_size=16,
        seed=seed,
        epochs=3,
    )


def onecycle_sgd(seed):
    train, val = kit.digits(seed)
    steps = 4 * 43
    task = kit.Task(kit.mlp([64, 128, 10]), optimizer="sgd", lr=0.2, scheduler="onecycle", total_steps=steps)
    return _run(task, train, val, seed=seed, epochs=4)


def onecycle_lstm(seed):
    train, val, vocab = kit.text_tokens(seed)
    steps = 4 * 15
    task = kit.Task(
        kit.RNNLM(vocab), loss="lm", optimizer="adam", lr=1e-2, scheduler="onecycle", total_steps=steps
    )
    return _run(task, train, val, seed=seed, epochs=4)


def cosine_adamw(seed):
    train, val = kit.blobs(seed)
    task = kit.Task(
        kit.mlp([16, 64, 4]),
        optimizer="adamw",
        lr=3e-3,
        weight_decay=0.01,
        scheduler="cosine",
        total_steps=5 * 19,
    )
    return _run(task, train, val, seed=seed, epochs=5)


def warmed_up_transformer(seed):
    train, val, vocab = kit.text_tokens(seed)
    task = kit.Task(
        kit.TinyTransformer(vocab), loss="lm", optimizer="adamw", lr=3e-3, scheduler="warmup", warmup_steps=20
    )
    return _run(task, train, val, seed=seed, epochs=4)


def label_noise_30(seed):
    train, val = kit.digits(seed, label_noise=0.3)
    return _run(kit.Task(kit.mlp([64, 64, 10]), lr=1e-3), train, val, seed=seed, epochs=5)


def high_bayes_error_moons(seed):
    train, val = kit.moons(seed, noise=0.6)
    return _run(kit.Task(kit.mlp([2, 32, 2]), lr=3e-3), train, val, seed=seed, epochs=6)


def overlapping_blobs(seed):
    train, val = kit.blobs(seed, spread=3.0)
    return _run(kit.Task(kit.mlp([16, 32, 4]), lr=3e-3), train, val, seed=seed, epochs=5)


def tiny_in_memory(seed):
    train, val = kit.moons(seed, n=64)
    return _run(kit.Task(kit.mlp([2, 16, 2]), lr=1e-2), train, val, batch_size=8, seed=seed, epochs=10)


def tiny_regression(seed):
    train, val = kit.regression(seed, n=96, features=4)
    return _run(
        kit.Task(kit.mlp([4, 16, 1]), loss="mse", lr=1e-2), train, val, batch_size=8, seed=seed, epochs=8
    )


def grad_accumulation(seed):
    train, val = kit.digits(seed)
    return _run(
        kit.Task(kit.mlp([64, 64, 10]), lr=2e-3),
        train,
        val,
        batch_size=16,
        seed=seed,
        epochs=3,
        accumulate_grad_batches=4,
    )


def bf16_mixed(seed):
    train, val = kit.digits(seed)
    return _run(
        kit.Task(kit.mlp([64, 128, 10]), lr=2e-3), train, val, seed=seed, epochs=3, precision="bf16-mixed"
    )


def fp16_gradscaler(seed):
    train, val = kit.digits(seed)
    task = kit.Task(kit.mlp([64, 128, 10]), lr=2e-3)
    return _run(task, train, val, seed=seed, epochs=3, precision="16-mixed")


def batchnorm_mlp(seed):
    train, val = kit.digits(seed)
    return _run(
        kit.Task(kit.mlp([64, 128, 64, 10], batchnorm=True), optimizer="sgd", lr=0.05),
        train,
        val,
        seed=seed,
        epochs=3,
    )


def batchnorm_cnn(seed):
    train, val = kit.digits_images(seed)
    return _run(kit.Task(kit.SmallCNN(batchnorm=True), lr=2e-3), train, val, seed=seed, epochs=3)


def dropout_mlp(seed):
    train, val = kit.digits(seed)
    return _run(kit.Task(kit.mlp([64, 256, 256, 10], dropout=0.5), lr=1e-3), train, val, seed=seed, epochs=4)


def converged_keeps_training(seed):
    train, val = kit.blobs(seed, spread=0.3)
    return _run(kit.Task(kit.mlp([16, 32, 4]), lr=1e-2), train, val, seed=seed, epochs=12)


def converged_two_layer_sgd(seed):
    train, val = kit.moons(seed, noise=0.05)
    return _run(
        kit.Task(kit.mlp([2, 64, 2]), optimizer="sgd", lr=0.1),
        train,
        val,
        batch_size=16,
        seed=seed,
        epochs=12,
    )


def shorter_than_log_interval(seed):
    train, val = kit.digits(seed)
    dl = DataLoader(train, batch_size=32, shuffle=True)
    return Run(kit.Task(kit.mlp([64, 64, 10])), dl, DataLoader(val, batch_size=256), {"max_steps": 20})


def no_validation_loop(seed):
    train, _ = kit.digits(seed)
    dl = DataLoader(train, batch_size=32, shuffle=True)
    return Run(kit.Task(kit.mlp([64, 64, 10])), dl, None, {"max_epochs": 2}, monitor=None)


def small_cnn_adam(seed):
    train, val = kit.digits_images(seed)
    return _run(kit.Task(kit.SmallCNN(), lr=1e-3), train, val, seed=seed, epochs=3)


def deep_residual_free_relu(seed):
    train, val = kit.digits(seed)
    return _run(kit.Task(kit.mlp([64] + [64] * 6 + [10]), lr=1e-3), train, val, seed=seed, epochs=3)


def frozen_backbone_finetune(seed):
    train, val = kit.digits(seed)
    net = kit.mlp([64, 64, 64, 10])
    for p in net[0].parameters():
        p.requires_grad_(False)  # frozen on purpose (and left out of the optimizer)
    return _run(kit.Task(net, lr=2e-3), train, val, seed=seed, epochs=3)


def regression_mse(seed):
    train, val = kit.regression(seed)
    return _run(kit.Task(kit.mlp([8, 64, 64, 1]), loss="mse", lr=3e-3), train, val, seed=seed, epochs=5)


def bce_moons(seed):
    train, val = kit.moons(seed)
    return _run(kit.Task(kit.mlp([2, 32, 32, 1]), loss="bce", lr=5e-3), train, val, seed=seed, epochs=5)


def val_every_half_epoch(seed):
    train, val = kit.digits(seed)
    return _run(
        kit.Task(kit.mlp([64, 64, 10]), lr=1e-3), train, val, seed=seed, epochs=3, val_check_interval=0.5
    )


def log_every_step(seed):
    train, val = kit.blobs(seed)
    return _run(
        kit.Task(kit.mlp([16, 32, 4]), optimizer="sgd", lr=0.05),
        train,
        val,
        seed=seed,
        epochs=3,
        log_every_n_steps=1,
    )


H = "healthy"
SCENARIOS: list[Scenario] = [
    Scenario(
        "sgd_momentum_mlp",
        H,
        (),
        "SGD + momentum 0.9: heavy-tailed gradient norms are ordinary",
        sgd_momentum_mlp,
        fast=True,
    ),
    Scenario(
        "batch_size_8", H, (), "batch size 8: noisy per-step loss and gradient norm", batch_size_8, fast=True
    ),
    Scenario("batch_size_4_adam", H, (), "batch size 4 with Adam on two moons", batch_size_4_adam),
    Scenario("lstm_tokens", H, (), "an LSTM language model on character ids", lstm_tokens, fast=True),
    Scenario("gru_tokens_sgd", H, (), "a GRU language model with SGD + momentum", gru_tokens_sgd),
    Scenario(
        "onecycle_sgd",
        H,
        (),
        "a OneCycle schedule: the rate (and the gradient norm) rise 25x in the first third",
        onecycle_sgd,
        fast=True,
    ),
    Scenario("onecycle_lstm", H, (), "OneCycle on an LSTM LM", onecycle_lstm),
    Scenario("cosine_adamw", H, (), "AdamW with a cosine decay to 0", cosine_adamw),
    Scenario(
        "warmed_up_transformer",
        H,
        (),
        "a small transformer with linear warmup: norms move a lot early",
        warmed_up_transformer,
        fast=True,
    ),
    Scenario(
        "label_noise_30",
        H,
        (),
        "30% of the labels are random: the loss floor is the noise, not underfitting",
        label_noise_30,
        fast=True,
    ),
    Scenario(
        "high_bayes_error_moons",
        H,
        (),
        "two moons with noise 0.6: high Bayes error, the loss stays high",
        high_bayes_error_moons,
    ),
    Scenario(
        "overlapping_blobs", H, (), "heavily overlapping clusters: a high irreducible loss", overlapping_blobs
    ),
    Scenario(
        "tiny_in_memory",
        H,
        (),
        "48 in-memory samples, a tiny model: steps of ~1 ms, loader share is meaningless",
        tiny_in_memory,
        fast=True,
    ),
    Scenario("tiny_regression", H, (), "a tiny in-memory regression with batch size 8", tiny_regression),
    Scenario("grad_accumulation", H, (), "accumulate_grad_batches=4", grad_accumulation),
    Scenario("bf16_mixed", H, (), "bf16-mixed autocast on CPU", bf16_mixed),
    Scenario(
        "fp16_gradscaler",
        H,
        (),
        "16-mixed with Lightning's GradScaler path (early overflows are normal)",
        fp16_gradscaler,
    ),
    Scenario(
        "batchnorm_mlp",
        H,
        (),
        "BatchNorm in an MLP (batch statistics are not a batch-dependence bug)",
        batchnorm_mlp,
        fast=True,
    ),
    Scenario("batchnorm_cnn", H, (), "BatchNorm in a small CNN", batchnorm_cnn),
    Scenario("dropout_mlp", H, (), "dropout 0.5: train loss above val loss", dropout_mlp),
    Scenario(
        "converged_keeps_training",
        H,
        (),
        "an easy task that converges in an epoch and keeps training: tiny gradients, a flat loss",
        converged_keeps_training,
        fast=True,
    ),
    Scenario(
        "converged_two_layer_sgd",
        H,
        (),
        "a 2-layer MLP that has converged on two moons: small loss, small gradients",
        converged_two_layer_sgd,
    ),
    Scenario(
        "shorter_than_log_interval",
        H,
        (),
        "20 steps, fewer than the default logging interval of 50",
        shorter_than_log_interval,
        fast=True,
    ),
    Scenario("no_validation_loop", H, (), "no validation loop at all", no_validation_loop),
    Scenario("small_cnn_adam", H, (), "a small CNN with Adam", small_cnn_adam),
    Scenario(
        "deep_plain_relu",
        H,
        (),
        "a 7-layer plain ReLU MLP with default init and Adam",
        deep_residual_free_relu,
    ),
    Scenario(
        "frozen_backbone_finetune",
        H,
        (),
        "the first layer frozen on purpose (requires_grad=False)",
        frozen_backbone_finetune,
    ),
    Scenario("regression_mse", H, (), "an MSE regression with Adam", regression_mse),
    Scenario("bce_moons", H, (), "BCEWithLogits on two moons", bce_moons),
    Scenario(
        "val_every_half_epoch",
        H,
        (),
        "validation twice per epoch (val_check_interval=0.5)",
        val_every_half_epoch,
    ),
    Scenario("log_every_step", H, (), "log_every_n_steps=1", log_every_step),
]
