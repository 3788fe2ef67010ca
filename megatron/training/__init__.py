"""Training: arguments, optimizer, schedules, loss scaling, checkpointing, logging, pretrain()."""
