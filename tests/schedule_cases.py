"""Scheduler constructor arguments shared by the schedule and parity tests."""

# Constructor arguments shared by both libraries; the runs cover warmup ends,
# milestones, T_max and total_iters, and epochs past them.
SCHEDULERS = {
    "ConstantLR": dict(base_lr=0.5, factor=0.25, total_iters=4),
    "StepLR": dict(base_lr=0.5, step_size=4, gamma=0.5),
    "MultiStepLR": dict(base_lr=0.5, milestones=[3, 7, 15], gamma=0.3),
    "ExponentialLR": dict(base_lr=0.5, gamma=0.9),
    "CosineAnnealingLR": dict(base_lr=0.5, T_max=12, eta_min=0.01),
    "LinearLR": dict(base_lr=0.5, start_factor=0.1, end_factor=1.0, total_iters=8),
    "PolynomialLR": dict(base_lr=0.5, total_iters=12, power=2.0),
    "WarmupScheduler": dict(base_lr=0.5, warmup_epochs=5, warmup_start_lr=0.01),
    "WarmupCosineSchedule": dict(
        base_lr=0.5, warmup_steps=5, total_steps=20, warmup_start_lr=0.0, eta_min=0.01
    ),
}
