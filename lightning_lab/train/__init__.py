"""Turning trajectories into weight updates.

Data path: ``PPOTrainer.step`` (trainer) → credit strategy → ``score`` (scoring: the update's
forward) → ``ppo_loss`` (ppo: the PPO loss) → optimizer; ``ValueHead`` (critic) for ``value``
credit; ``checkpoint`` does atomic I/O of the trainer's state.
"""
